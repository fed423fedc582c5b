"""`moetron plan MODEL [options]`: the planner on the command line.

    moetron plan gpt4 --gpu a100-80gb --gpus 25000 --tokens 13e12 --batch-tokens 60e6 \\
        --inference-gpus 128
    moetron plan mixtral-8x7b --gpu h100 --gpus 512 --json
    moetron plan path/to/config.json --gpu h200 --days 30 --plot plan.png
    moetron plan tiny --gpu cpu --measure
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from moetron.plan.hardware import accelerator_names
from moetron.plan.inference import WEIGHT_BYTES
from moetron.plan.memory import PRECISIONS, RECOMPUTE_MODES
from moetron.plan.planner import (
    DEFAULT_TARGET_DAYS,
    PlanError,
    PlanRequest,
    default_seq_len,
    load_model,
    make_plan,
    model_names,
)

if TYPE_CHECKING:
    from moetron.plan.measure import ClosedLoop

FIXABLE = ("tp", "pp", "dp", "ep", "zero", "microbatch", "virtual_stages")


def _count(text: str) -> float:
    """1e12, 13T, 60M, 1.5B, 16384 -> float."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    text = text.strip().replace("_", "").replace(",", "")
    try:
        if text and text[-1].upper() in scale:
            return float(text[:-1]) * scale[text[-1].upper()]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 13e12, 13T, 60M)") from None


def _positive_int(text: str) -> int:
    value = _count(text)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(value)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan` on a `moetron` sub-command parser; the handler is `args.func`."""
    p = subparsers.add_parser(
        "plan",
        help="parameters, FLOPs, training layouts/time/cost and a serving cluster for a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help=f"preset or published model ({', '.join(model_names())}), a moetron TOML with a [model] "
        "table, or a Hugging Face config.json (or its directory)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--gpu", default="h100", help=f"accelerator: {', '.join(accelerator_names())} (default h100)"
    )
    t.add_argument("--gpus", type=_positive_int, help="cluster size (default: fewest that finish in --days)")
    t.add_argument(
        "--tokens", type=_count, help="training tokens, e.g. 13e12 or 13T (default: 20 per active parameter)"
    )
    t.add_argument(
        "--seq-len", type=_positive_int, help="training sequence length (default: the model's, ≤ 8192)"
    )
    t.add_argument(
        "--batch-tokens",
        type=_count,
        help="global batch in tokens (default 16M, or tokens/10,000 if less; cpu: 8 sequences)",
    )
    t.add_argument(
        "--precision", choices=sorted(PRECISIONS), help="bf16 (default), fp8 GEMMs, or fp32 (cpu default)"
    )
    t.add_argument("--days", type=float, default=DEFAULT_TARGET_DAYS, help="target when --gpus is not given")
    t.add_argument("--price-per-gpu-hour", type=float, help="override the table's on-demand price (USD)")
    t.add_argument(
        "--ep-overlap", type=float, default=0.0, help="share of expert all-to-all hidden by compute (0..1)"
    )
    t.add_argument(
        "--sync-checkpoint", action="store_true", help="checkpoints block training (default: asynchronous)"
    )
    for name in FIXABLE:
        t.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            dest=f"fix_{name}",
            help=f"fix {name} in the layout search",
        )
    t.add_argument("--recompute", choices=RECOMPUTE_MODES, help="fix activation recomputation")
    t.add_argument("--top", type=_positive_int, default=5, help="layouts to list (default 5)")
    i = p.add_argument_group("inference")
    i.add_argument("--inference-gpu", help="accelerator for serving (default: --gpu)")
    i.add_argument(
        "--inference-gpus", type=_positive_int, help="serving cluster size (default: fewest that fit)"
    )
    i.add_argument(
        "--concurrency",
        type=_positive_int,
        help="sequences decoded together (default: as many as fit, or 64)",
    )
    i.add_argument(
        "--context", type=_positive_int, help="tokens per sequence (default: min(32768, max_seq_len))"
    )
    i.add_argument("--weight-dtype", choices=list(WEIGHT_BYTES), default="bf16", help="serving weight format")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    o.add_argument("--plot", metavar="FILE.png", help="draw memory per GPU and days against cluster size")
    o.add_argument(
        "--measure", action="store_true", help="with --gpu cpu: run training steps here and compare"
    )
    p.set_defaults(func=run_plan)


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    fixed = [
        (name, getattr(args, f"fix_{name}")) for name in FIXABLE if getattr(args, f"fix_{name}") is not None
    ]
    if args.recompute:
        fixed.append(("recompute", args.recompute))
    return PlanRequest(
        model=args.model,
        gpu=args.gpu,
        num_gpus=args.gpus,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        precision=args.precision,
        price_per_gpu_hour=args.price_per_gpu_hour,
        target_days=args.days,
        ep_overlap=args.ep_overlap,
        async_checkpoint=not args.sync_checkpoint,
        fixed=tuple(fixed),
        inference_gpu=args.inference_gpu,
        inference_gpus=args.inference_gpus,
        concurrency=args.concurrency,
        context=args.context,
        weight_dtype=args.weight_dtype,
        keep=args.top,
    )


def _measure(args: argparse.Namespace) -> ClosedLoop:
    from moetron.plan.measure import run_closed_loop

    if args.gpu.lower() != "cpu":
        raise PlanError("--measure runs on this machine: use it with --gpu cpu")
    source = load_model(args.model)
    seq_len = args.seq_len or min(default_seq_len(source.cfg), 256)
    batch = max(1, round((args.batch_tokens or 4 * seq_len) / seq_len))
    return run_closed_loop(source.cfg, batch=batch, seq_len=seq_len, name=source.name)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (or its JSON); 2 with a message on stderr for bad input or no fitting layout."""
    try:
        plan = make_plan(request_from_args(args))
        if args.plot:
            from moetron.plan.report import plot

            plot(plan, args.plot)
        measured = _measure(args) if args.measure else None
    except (PlanError, RuntimeError) as e:
        print(f"moetron plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = plan.to_json()
        if measured:
            out["closed_loop"] = {
                "batch": measured.batch,
                "seq_len": measured.seq_len,
                "predicted_step_s": measured.predicted.step.total,
                "measured_step_s": measured.measured_step_s,
                "step_error": measured.step_error,
                "predicted_peak_bytes": measured.predicted.memory.total,
                "measured_peak_bytes": measured.measured_peak_bytes,
                "memory_error": measured.memory_error,
            }
        print(json.dumps(out, indent=2))
        return 0
    from moetron.plan.measure import render as render_closed_loop
    from moetron.plan.report import render

    print(render(plan))
    if args.plot:
        print(f"\nwrote {args.plot}")
    if measured:
        print("\n" + render_closed_loop([measured]))
    return 0
