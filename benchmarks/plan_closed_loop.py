"""The planner's closed loop: predict a CPU training step, run it, report the error.

    python -m benchmarks.plan_closed_loop                  # tiny and small (2 and 8 layers), 4 x 256
    python -m benchmarks.plan_closed_loop --configs small --batch 8 --seq 512 --threads 2

For each config the planner (moetron/plan: training.py step time, memory.py peak memory) predicts
one forward + backward + AdamW step in fp32 on this CPU, with the CPU's matmul rate and copy
bandwidth probed first; then moetron.model.Transformer runs that step on random tokens and the
fastest of a few steps and the rise of the process's peak resident memory are compared
(moetron/plan/measure.py says exactly how). Each config runs in a fresh process so one config's
memory peak cannot hide another's. On a shared machine the absolute times wobble: run it twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

CONFIGS = {
    "tiny": ("tiny", None),
    "small-2L": ("small", 2),
    "small": ("small", None),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one config in this process, print JSON
    return p.parse_args()


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    from moetron.config import get_preset
    from moetron.plan.measure import run_closed_loop

    if args.threads:
        torch.set_num_threads(args.threads)
    preset, num_layers = CONFIGS[name]
    cfg = get_preset(preset)
    if num_layers:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    r = run_closed_loop(cfg, batch=args.batch, seq_len=args.seq, steps=args.steps, name=name)
    return {
        "name": name,
        "predicted_step_s": r.predicted.step.total,
        "measured_step_s": r.measured_step_s,
        "predicted_peak_bytes": r.predicted.memory.total,
        "measured_peak_bytes": r.measured_peak_bytes,
        "step_breakdown_s": dataclasses.asdict(r.predicted.step),
        "memory_breakdown_bytes": r.predicted.memory.as_dict(),
        "peak_reset": r.peak_reset,
    }


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    from moetron.plan.hardware import probe_cpu
    from moetron.plan.report import table

    results = []
    for name in args.configs:
        cmd = [sys.executable, "-m", "benchmarks.plan_closed_loop", "--one", name, "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--steps", str(args.steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for r in results:
        step_error = r["predicted_step_s"] / r["measured_step_s"] - 1
        memory_error = r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1
        rows.append(
            [
                r["name"],
                f"{args.batch}×{args.seq}",
                f"{r['predicted_step_s'] * 1e3:,.1f}",
                f"{r['measured_step_s'] * 1e3:,.1f}",
                f"{step_error:+.0%}",
                f"{r['predicted_peak_bytes'] / 2**20:,.0f}",
                f"{r['measured_peak_bytes'] / 2**20:,.0f}",
                f"{memory_error:+.0%}",
            ]
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"this CPU: {probe_cpu().notes} (probed in the parent; each config re-probes in its own process)")
    print(
        "\n".join(
            table(["config", "", "pred. ms", "meas. ms", "error", "pred. MiB", "meas. MiB", "error"], rows)
        )
    )
    for r in results:
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["step_breakdown_s"].items() if v)
        memory = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["memory_breakdown_bytes"].items())
        print(f"  {r['name']}: predicted ms = {parts}; MiB = {memory}")


if __name__ == "__main__":
    main()
