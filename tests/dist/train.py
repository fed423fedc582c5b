"""`moetron train` under torchrun, as the distributed tests need it: stopped early, or killed.

    torchrun ... tests/dist/train.py CONFIG [--stop-after=N] [--kill-rank=R --kill-at-batch=K] [--slow-rank=R] --section.key=value...

--stop-after=N ends the run after step N with a checkpoint (trainer.train's stop_after), as a job
that ran out of time. --kill-rank/--kill-at-batch: in the first attempt of an elastic job
(TORCHELASTIC_RESTART_COUNT=0), global rank R sends itself SIGKILL when it asks the data loader
for its K-th micro-batch, i.e. in the middle of a training step, while the other ranks wait in a
collective. The restarted attempt runs normally. --slow-rank=R: the trainer's clock is a stepped
one (each step lasts exactly 0.5 s), except on rank R, whose steps last 1 s.
"""

from __future__ import annotations

import os
import signal
import sys

from moetron.config import load_run_config
from moetron.data.loader import PackedLoader
from moetron.train import trainer
from moetron.train.trainer import train


def _kill_at(batch: int) -> None:
    next_batch = PackedLoader.next_batch
    calls = [0]

    def counting_next_batch(self: PackedLoader):
        calls[0] += 1
        if calls[0] == batch:
            print(f"[test] rank {os.environ['RANK']}: SIGKILL at micro-batch {batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return next_batch(self)

    PackedLoader.next_batch = counting_next_batch


class SteppedClock:
    """time.perf_counter for the trainer: each call advances `tick`, so each step (the time between
    two calls) lasts exactly `tick`, whatever the machine's speed (also tests/test_train.py's)."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def main(argv: list[str]) -> None:
    options = {a.split("=", 1)[0]: int(a.split("=", 1)[1]) for a in argv if a.split("=", 1)[0] in _OPTIONS}
    rest = [a for a in argv if a.split("=", 1)[0] not in _OPTIONS]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if "--kill-rank" in options and first_attempt and int(os.environ["RANK"]) == options["--kill-rank"]:
        _kill_at(options["--kill-at-batch"])
    if "--slow-rank" in options:
        trainer.time = SteppedClock(1.0 if int(os.environ["RANK"]) == options["--slow-rank"] else 0.5)
    train(load_run_config(rest[0], rest[1:]), stop_after=options.get("--stop-after"))


_OPTIONS = ("--stop-after", "--kill-rank", "--kill-at-batch", "--slow-rank")

if __name__ == "__main__":
    main(sys.argv[1:])
