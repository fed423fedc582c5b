"""Does the MoE buy quality per unit of compute here? The demo's MoE and the dense model with the same
active parameters, each trained for the same wall-clock time on this machine.

    python -m benchmarks.moe_vs_dense                     # configs/demo.toml vs configs/demo_dense.toml
    python -m benchmarks.moe_vs_dense --minutes 3         # both for 3 minutes of training
    python -m benchmarks.moe_vs_dense --as-shipped        # each config's own step count, as the demo runs
    python -m benchmarks.moe_vs_dense --train.batch_size=32   # a setting for both runs

Protocol: the MoE trains first, as its config says (the demo's own run, deterministic), and its
measured training time (the sum of its step times; evaluation and checkpoints excluded) becomes the
dense run's `train.time_budget_s`: the dense model trains until it has spent that time, its cosine
decaying over the time rather than over a step count guessed in advance (the trainer's time budget;
it stops within one step of the budget). With `--minutes` both train on that budget. Each trains in
its own `moetron train` process on the same data and tokenizer, and the table reports what its
metrics.jsonl says: the measured training time, median tokens/s and MFU (against the measured matmul
peak of the dtype used), how many times the run read the training text (`corpus passes`), its mean
training loss over the last tenth of its steps beside the final validation loss (a gap between them
that grows with the passes is memorisation: the bundled corpus is ~1.3M tokens), and the validation
bits per byte. Runs go to runs/moe_vs_dense/ (replaced each time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import print_table
from moetron import hardware
from moetron.config import Config, load_run_config
from moetron.data import prepare
from moetron.model.accounting import param_counts

ROOT = Path(__file__).resolve().parent.parent
# A time-budgeted run's step cap, as a multiple of its config's steps: far more than the budget
# allows, so the budget decides where it stops.
STEP_CAP_FACTOR = 10


@dataclass
class Run:
    name: str
    config: str
    records: list[dict] | None = None

    @property
    def steps(self) -> int:
        return len(self.records or [])

    @property
    def train_s(self) -> float:
        return sum(r["step_time_s"] for r in self.records or [])

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.records or [])

    def last(self, key: str) -> float:
        return next(r[key] for r in reversed(self.records or []) if key in r)

    def late_train_loss(self) -> float:
        """The mean training LM loss over the last tenth of the steps: beside the validation loss,
        how much of the training text the model has memorised."""
        losses = [r["lm_loss"] for r in self.records or [] if "lm_loss" in r]
        return statistics.fmean(losses[-max(len(losses) // 10, 1) :])


def corpus_passes(cfg: Config, steps: int) -> float:
    """How many times `steps` steps of one process read the training split (prepare() reuses the
    shards the run wrote: no tokenizing here)."""
    data = prepare(replace(cfg.data, dir=str(ROOT / cfg.data.dir)), seed=cfg.train.seed, progress=False)
    tc = cfg.train
    return steps * tc.batch_size * tc.seq_len * tc.grad_accum_steps / data.num_train_tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="configs/demo.toml")
    p.add_argument("--dense", default="configs/demo_dense.toml")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training time per model (default: what the MoE config's own run takes)",
    )
    p.add_argument("--as-shipped", action="store_true", help="run each config's own steps, no time budget")
    p.add_argument("--out", default="runs/moe_vs_dense")
    # --section.key=value settings for both runs (e.g. --train.batch_size=32), as `moetron train` takes them
    args, args.overrides = p.parse_known_args()
    if bad := [o for o in args.overrides if not (o.startswith("--") and "." in o.split("=")[0])]:
        p.error(f"not a --section.key=value setting: {' '.join(bad)}")
    return args


def train(run: Run, out_dir: Path, settings: list[str]) -> None:
    """One `moetron train` process; keeps its metrics records."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "moetron", "train", run.config, f"--train.out_dir={out_dir}",
        "--train.overwrite=true", "--train.progress=false", *settings,
    ]  # fmt: skip
    print(f"[{run.name}] moetron train {run.config} {' '.join(settings)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    run.records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def time_budgeted(run: Run, seconds: float, overrides: list[str]) -> list[str]:
    """Settings that train `run` for `seconds` of step time, its warmup and evaluations as configured."""
    tc = load_run_config(run.config, overrides).train
    cap = tc.steps * STEP_CAP_FACTOR
    return [
        *overrides, f"--train.time_budget_s={seconds:.3f}", f"--train.steps={cap}",
        f"--train.checkpoint_every={cap}",
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    moe, dense = runs = [Run("moe", args.moe), Run("dense", args.dense)]
    print(f"{hardware.detect().describe()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)

    if args.as_shipped:
        for run in runs:
            train(run, out / run.name, args.overrides)
    elif args.minutes:
        for run in runs:
            train(run, out / run.name, time_budgeted(run, args.minutes * 60, args.overrides))
    else:
        train(moe, out / moe.name, args.overrides)
        train(dense, out / dense.name, time_budgeted(dense, moe.train_s, args.overrides))

    rows, passes = [], []
    for run in runs:
        # the run's resolved config: the trainer takes the vocabulary size from the tokenizer
        cfg = Config.from_dict(json.loads((out / run.name / "config.json").read_text()))
        counts = param_counts(cfg.model)
        passes.append(corpus_passes(cfg, run.steps))
        rows.append([
            run.name, f"{counts.total / 1e6:.1f}M / {counts.active / 1e6:.1f}M", run.steps,
            f"{run.train_s:.0f}", f"{run.median('tokens_per_s'):.0f}", f"{run.median('mfu'):.1%}",
            f"{passes[-1]:.1f}", f"{run.late_train_loss():.3f}", f"{run.last('val_loss'):.3f}",
            f"{run.last('val_bpb'):.3f}",
        ])  # fmt: skip
    print()
    print_table(
        [
            "model",
            "params total / active",
            "steps",
            "train s",
            "tokens/s",
            "MFU",
            "corpus passes",
            "train loss (last 10%)",
            "val loss",
            "val bits/byte",
        ],
        rows,
    )
    gap = dense.last("val_bpb") - moe.last("val_bpb")
    verdict = "MoE wins" if gap > 0 else "dense wins"
    print(
        f"\n{verdict}: MoE {moe.last('val_bpb'):.3f} vs dense {dense.last('val_bpb'):.3f} bits/byte "
        f"({gap:+.3f}) after {moe.train_s:.0f} s vs {dense.train_s:.0f} s of training; MoE "
        f"{'meets' if moe.last('val_bpb') <= 2.0 else 'MISSES'} the <= 2.0 bits/byte target"
    )
    if max(passes) > 2:
        print(
            f"note: the runs read the training text {min(passes):.1f}-{max(passes):.1f} times: where the "
            "validation loss sits well above the late training loss they are memorising it, and a longer "
            "race measures that more than quality per FLOP"
        )
    if args.as_shipped:
        print("note: --as-shipped trains each config's own steps: the training times differ")


if __name__ == "__main__":
    main()
