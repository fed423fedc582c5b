"""Does the MoE buy quality per unit of compute here? The demo's MoE and the dense model with the same
active parameters, each trained for the same wall-clock time on this machine.

    python -m benchmarks.moe_vs_dense                     # configs/demo.toml vs configs/demo_dense.toml
    python -m benchmarks.moe_vs_dense --minutes 3         # a shorter race
    python -m benchmarks.moe_vs_dense --as-shipped        # each config's own step count, as the demo runs
    python -m benchmarks.moe_vs_dense --train.batch_size=32   # a setting for both runs

Protocol: both configs are first timed for a few steps each, interleaved (MoE, dense, MoE, dense),
to size each run so its training steps take `--minutes` (each config keeps its schedule's shape:
warmup as the same fraction of the run, cosine decay to the end). After the MoE's run, the dense
config is timed again and its run sized to the MoE's measured training time; if its training time
still differs from the MoE's by more than 5%, it trains once more, sized from its own measured
steps. Each trains in its own `moetron train` process on the same data and tokenizer, and the
table reports what its
metrics.jsonl says: the measured training time (sum of step times; evaluation excluded), median
tokens/s and MFU (against the measured matmul peak of the dtype used), and the final validation loss
and bits per byte. Runs go to runs/moe_vs_dense/ (replaced each time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import print_table
from moetron import hardware
from moetron.config import load_run_config
from moetron.model.accounting import param_counts

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_STEPS = 16  # per calibration run; the first four steps (warm-up) are not timed
UNTIMED_STEPS = 4
TIME_TOLERANCE = 0.05  # the most the two runs' training times may differ before the dense run is redone


@dataclass
class Run:
    name: str
    config: str
    steps: int = 0
    step_samples: list[float] = field(default_factory=list)  # step times from calibration runs
    records: list[dict] | None = None

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_samples)

    @property
    def train_s(self) -> float:
        return sum(r["step_time_s"] for r in self.records or [])

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.records or [])

    def last(self, key: str) -> float:
        return next(r[key] for r in reversed(self.records or []) if key in r)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="configs/demo.toml")
    p.add_argument("--dense", default="configs/demo_dense.toml")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training time per model (default: the MoE config's own run)",
    )
    p.add_argument("--as-shipped", action="store_true", help="run each config's own steps, no resizing")
    p.add_argument("--out", default="runs/moe_vs_dense")
    # --section.key=value settings for both runs (e.g. --train.batch_size=32), as `moetron train` takes them
    args, args.overrides = p.parse_known_args()
    if bad := [o for o in args.overrides if not (o.startswith("--") and "." in o.split("=")[0])]:
        p.error(f"not a --section.key=value setting: {' '.join(bad)}")
    return args


def train(run: Run, out_dir: Path, settings: list[str]) -> list[dict]:
    """One `moetron train` process; returns its metrics records."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "moetron", "train", run.config, f"--train.out_dir={out_dir}",
        "--train.overwrite=true", "--train.progress=false", *settings,
    ]  # fmt: skip
    subprocess.run(
        command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL if "calib" in out_dir.name else None
    )
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def calibrate(runs: list[Run], out: Path, overrides: list[str], rounds: int = 2) -> None:
    """Median step time of each config from `rounds` short runs each, interleaved; samples from
    earlier calibrations of a run are kept."""
    # the calibration's own length last, so that a --train.steps=... meant for the race is not it
    settings = [*overrides, f"--train.steps={CALIBRATION_STEPS}", f"--train.eval_every={CALIBRATION_STEPS}",
                f"--train.checkpoint_every={CALIBRATION_STEPS}", "--train.eval_batches=1"]  # fmt: skip
    for _ in range(rounds):
        for run in runs:
            records = train(run, out / f"{run.name}-calibration", settings)
            run.step_samples += [r["step_time_s"] for r in records[UNTIMED_STEPS:]]
    for run in runs:
        shutil.rmtree(out / f"{run.name}-calibration", ignore_errors=True)


def resized(run: Run, minutes: float, overrides: list[str]) -> list[str]:
    """Settings that make `run` train for `minutes`, its schedule's proportions kept."""
    tc = load_run_config(run.config, overrides).train
    run.steps = max(int(minutes * 60 / run.step_s), 8)
    warmup = max(round(tc.warmup_steps * run.steps / tc.steps), 1)
    evals = max(tc.steps // tc.eval_every, 1)
    return [
        f"--train.steps={run.steps}", f"--train.warmup_steps={warmup}",
        f"--train.eval_every={max(run.steps // evals, 1)}", f"--train.checkpoint_every={run.steps}",
    ]  # fmt: skip


def main() -> None:
    args = parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run("moe", args.moe), Run("dense", args.dense)]
    print(f"{hardware.detect().describe()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)

    settings: dict[str, list[str]] = {}
    if args.as_shipped:
        for run in runs:
            run.steps = load_run_config(run.config, args.overrides).train.steps
            settings[run.name] = list(args.overrides)
    else:
        started = time.perf_counter()
        calibrate(runs, out, args.overrides)
        minutes = args.minutes or load_run_config(args.moe, args.overrides).train.steps * runs[0].step_s / 60
        for run in runs:
            settings[run.name] = [*args.overrides, *resized(run, minutes, args.overrides)]
        print(
            f"calibration ({time.perf_counter() - started:.0f} s): step time "
            + ", ".join(f"{r.name} {r.step_s:.2f} s" for r in runs)
            + f"; {minutes:.1f} min each: "
            + ", ".join(f"{r.name} {r.steps} steps" for r in runs),
            flush=True,
        )

    moe, dense = runs

    def size_to_moe(run: Run) -> None:
        settings[run.name] = [*args.overrides, *resized(run, moe.train_s / 60, args.overrides)]

    def train_logged(run: Run) -> None:
        print(f"[{run.name}] moetron train {run.config} {' '.join(settings[run.name])}", flush=True)
        run.records = train(run, out / run.name, settings[run.name])

    train_logged(moe)
    if not args.as_shipped:
        # Step times drift over minutes: time the dense config again now, and size its run to the
        # MoE's measured training time rather than to the estimate made before it.
        calibrate([dense], out, args.overrides, rounds=1)
        size_to_moe(dense)
        print(f"[dense] step time now {dense.step_s:.2f} s: {dense.steps} steps", flush=True)
    train_logged(dense)
    if not args.as_shipped and abs(dense.train_s / moe.train_s - 1) > TIME_TOLERANCE:
        # A 16-step calibration can misjudge a long run's steps (here by 14-17%): size the run once
        # more from its own measured steps, so that both get the same training time.
        print(
            f"[dense] trained {dense.train_s:.0f} s against the MoE's {moe.train_s:.0f} s: "
            f"again at its measured {dense.train_s / dense.steps:.3f} s a step",
            flush=True,
        )
        dense.step_samples = [dense.train_s / dense.steps]
        size_to_moe(dense)
        train_logged(dense)

    rows = []
    for run in runs:
        cfg = load_run_config(run.config, args.overrides).model
        counts = param_counts(cfg)
        rows.append([
            run.name, f"{counts.total / 1e6:.1f}M / {counts.active / 1e6:.1f}M", run.steps,
            f"{run.train_s:.0f}", f"{run.median('tokens_per_s'):.0f}", f"{run.median('mfu'):.0%}",
            f"{run.last('val_loss'):.3f}", f"{run.last('val_bpb'):.3f}",
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
    if abs(dense.train_s / moe.train_s - 1) > TIME_TOLERANCE:
        print(
            f"note: the training times differ by {dense.train_s / moe.train_s - 1:+.0%} (the machine's "
            "speed changed between runs); compare with care, or run again on a quieter machine"
        )


if __name__ == "__main__":
    main()
