"""A plan as a readable report, and as a figure (memory breakdown; days against cluster size)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moetron.plan import search
from moetron.plan.inference import weights_by_dtype
from moetron.plan.planner import Plan
from moetron.plan.published import PUBLISHED_RUNS, PublishedRun
from moetron.plan.validation import train_flops_6nd


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def seconds(s: float) -> str:
    return f"{s:,.2f} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def duration(days: float) -> str:
    if days >= 1:
        return f"{days:,.1f} d"
    hours = days * 24
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def usd(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"${n / scale:,.2f}{unit}" if unit != "k" else f"${n / scale:,.1f}k"
    return f"${n:,.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        line = "  ".join(
            c.ljust(w) if i <= 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        lines.append(indent + line.rstrip())
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def _published(plan: Plan) -> PublishedRun | None:
    return next((r for r in PUBLISHED_RUNS if r.model == plan.source.name), None)


def render(plan: Plan) -> str:
    figures = plan.model_figures()
    job, best, inf, cfg = plan.job, plan.best, plan.inference, plan.cfg
    out = [
        f"moetron plan: {plan.source.name} ({plan.source.kind}) — {cfg.num_layers} layers, dim {cfg.dim}, "
        f"{cfg.moe.num_experts if cfg.num_moe_layers else 'no'} experts"
        + (f" (top-{cfg.moe.top_k})" if cfg.num_moe_layers else "")
        + f", {cfg.num_heads} heads / {cfg.num_kv_heads} KV head"
        + ("s" if cfg.num_kv_heads > 1 else ""),
        "",
        "Model (model/accounting.py)",
    ]
    out += table(
        ["figure", "", "value"],
        [
            ["total parameters", "", human(figures["total_params"])],
            ["active parameters", "", human(figures["active_params"])],
            ["forward FLOPs / token", f"seq {job.seq_len:,}", f"{figures['flops_per_token']:.3e}"],
            ["  of which attention", "", f"{figures['attention_flops_per_token']:.3e}"],
            ["training FLOPs / token", "3 × forward", f"{figures['train_flops_per_token']:.3e}"],
            ["training FLOPs", f"{human(job.tokens)} tokens", f"{figures['train_flops']:.3e}"],
            ["  6·N·D convention", "no attention", f"{figures['train_flops_6nd']:.3e}"],
        ],
    )

    chose = " (fewest that finish in --days)" if plan.chose_num_gpus else ""
    out += [
        "",
        f"Training on {job.num_gpus:,} × {plan.device.name}{chose}: {job.precision.name}, seq {job.seq_len:,}, "
        f"batch {human(best.batch_sequences * job.seq_len)} tokens, {best.steps:,} steps",
    ]
    rows = [
        [
            str(rank),
            e.layout.describe(),
            gb(e.memory.total),
            seconds(e.step.total),
            f"{e.mfu:.1%}",
            duration(e.days),
            human(e.gpu_hours),
            usd(e.cost_usd),
        ]
        for rank, e in enumerate(plan.layouts, 1)
    ]
    out += table(["#", "layout", "memory/GPU", "step", "MFU", "wall clock", "GPU-hours", "cost"], rows)
    step, mem, fail = best.step, best.memory, best.failures
    parts = ", ".join(f"{k.replace('_', ' ')} {seconds(v)}" for k, v in dataclasses.asdict(step).items() if v)
    out += [
        f"  best: step {seconds(step.total)} = {parts}",
        "  memory/GPU: "
        + ", ".join(f"{k} {gb(v)}" for k, v in mem.as_dict().items())
        + f" = {gb(mem.total)} of {gb(plan.device.usable_memory_bytes)} usable (stage {mem.stage})",
        f"  failures: cluster MTBF {fail.cluster_mtbf_hours:,.1f} h, checkpoint every "
        f"{fail.checkpoint_interval_minutes:,.1f} min (pauses {fail.checkpoint_pause_seconds:.2g} s): "
        f"+{fail.overhead:.1%} wall clock ({duration(best.compute_days)} → {duration(best.days)})",
        f"  MFU {best.mfu:.1%} per step (HFU {best.hfu:.1%} with recomputation), "
        f"{best.effective_mfu:.1%} over the wall clock",
    ]
    if best.layout.world < job.num_gpus:
        out.append(
            f"  {job.num_gpus - best.layout.world:,} GPUs idle (tp·pp does not divide {job.num_gpus:,})"
        )

    weights = ", ".join(f"{k} {gb(v)}" for k, v in weights_by_dtype(plan.cfg).items())
    copies = f", stored {inf.kv_copies}× under {inf.tp}-way TP" if inf.kv_copies > 1 else ""
    out += [
        "",
        f"Inference on {inf.num_gpus:,} × {plan.inference_device.name} (tp{inf.tp} × pp{inf.pp}, "
        f"{inf.weight_dtype} weights)",
        f"  weights: {weights}",
        f"  KV cache: {inf.kv_bytes_per_token:,} B/token (bf16, all layers, {cfg.num_kv_heads} KV head{'s' if cfg.num_kv_heads > 1 else ''}){copies}; "
        f"{gb(32_768 * inf.kv_bytes_per_token)} per 32K-token sequence",
        f"  {inf.concurrency:,} concurrent sequences of {inf.context:,} tokens (room for {inf.max_concurrency:,}); "
        f"{gb(inf.memory_per_gpu_bytes)} per GPU",
        f"  decode: {inf.tokens_per_s:,.0f} tokens/s (memory-bound {inf.tokens_per_s_memory_bound:,.0f}, "
        f"compute-bound {inf.tokens_per_s_compute_bound:,.0f})",
        f"  cost: {usd(inf.usd_per_hour)}/h, {usd(inf.monthly_cost_usd)}/month, "
        f"{usd(inf.cost_per_million_tokens_usd)} per 1M generated tokens",
        *_engine_lines(plan),
    ]
    run = _published(plan)
    if run is not None:
        out += ["", f"Against the published figures ({run.source})", *_published_rows(plan, run)]
    out += ["", "Assumptions", *(f"  - {line}" for line in plan.assumptions)]
    return "\n".join(out)


def _engine_lines(plan: Plan) -> list[str]:
    """The layout moetron's own engine would serve with on the same devices, in its flags."""
    inf = plan.inference
    engine = plan.engine_layout()
    verdict = "fits" if engine.fits else "does NOT fit"
    lines = [
        f"  moetron's engine: moetron serve MODEL {engine.flags}",
        f"    per rank: {gb(engine.weights_per_rank_bytes)} {inf.weight_dtype} weights + "
        f"{gb(engine.kv_per_rank_bytes)} KV ({-(-inf.concurrency // engine.ranks):,} sequences) = "
        f"{gb(engine.memory_per_rank_bytes)}: {verdict} in one {plan.inference_device.name}",
    ]
    if engine.note:
        lines.append(f"    {engine.note}")
    return lines


def _published_rows(plan: Plan, run: PublishedRun) -> list[str]:
    figures, best, job, inf = plan.model_figures(), plan.best, plan.job, plan.inference
    rows: list[list[str]] = []
    if run.total_params:
        rows.append(["total parameters", human(run.total_params), human(figures["total_params"])])
    if run.active_params:
        rows.append(["active parameters", human(run.active_params), human(figures["active_params"])])
    same_run = job.tokens == run.tokens and job.seq_len == run.seq_len
    if run.flops and same_run:
        rows.append(["training FLOPs (6ND)", f"{run.flops:.3g}", f"{train_flops_6nd(run):.3g}"])
    same_cluster = same_run and run.gpu and job.num_gpus == run.num_gpus
    if run.days and same_cluster:
        rows.append(["training days", f"{run.days[0]:g}–{run.days[1]:g}", f"{best.days:.1f}"])
        peak = job.num_gpus * plan.device.peak_bf16_flops
        implied = [run.flops / (peak * d * 86_400) for d in run.days] if run.flops else []
        share = figures["train_flops_6nd"] / figures["train_flops"]
        if implied:
            rows.append(
                [
                    "MFU over wall clock (6ND)",
                    f"{implied[1]:.1%}–{implied[0]:.1%} implied",
                    f"{best.effective_mfu * share:.1%}",
                ]
            )
        rows.append(["MFU per step (with attention)", "n/a", f"{best.mfu:.1%}"])
    if run.gpu_hours and same_cluster:
        rows.append(["GPU-hours", human(run.gpu_hours), human(best.gpu_hours)])
    if run.model == "gpt4" and inf.num_gpus == 128:
        rows.append(["inference cluster cost / month", "$512k (16 × p4de)", usd(inf.monthly_cost_usd)])
    if not rows:
        return ["  (plan the published run to compare: see docs/planner.md)"]
    return table(["figure", "published", "planner"], rows)


# --- Plot -----------------------------------------------------------------------------------------


def plot(plan: Plan, path: str) -> None:
    """Memory breakdown of the best layouts, and training days against the number of GPUs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [e.layout.describe().replace(" ", "\n", 3) for e in plan.layouts]
    bottom = [0.0] * len(plan.layouts)
    for part in ("weights", "gradients", "optimizer", "activations", "logits"):
        values = [e.memory.as_dict()[part] / 1e9 for e in plan.layouts]
        left.bar(names, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.axhline(plan.device.usable_memory_bytes / 1e9, color="k", linestyle="--", label="usable")
    left.set_ylabel("GB per GPU")
    left.set_title(f"{plan.source.name}: memory per GPU, best layouts")
    left.legend(fontsize=8)
    left.tick_params(axis="x", labelsize=7)

    counts, days = days_vs_gpus(plan)
    right.plot(counts, days, marker="o")
    right.axvline(plan.job.num_gpus, color="gray", linestyle=":")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel(f"GPUs ({plan.device.name})")
    right.set_ylabel("training days (best layout, with failures)")
    right.set_title(f"{plan.job.tokens:.3g} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def days_vs_gpus(
    plan: Plan, factors: Sequence[float] = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
) -> tuple[list, list]:
    counts, days = [], []
    for factor in factors:
        gpus = max(1, int(plan.job.num_gpus * factor))
        if plan.device.scale_up_size == 1 and gpus > 1 and plan.job.num_gpus == 1:
            continue  # a CPU plan: only this machine
        found = search.search(dataclasses.replace(plan.job, num_gpus=gpus), keep=1)
        if found:
            counts.append(gpus)
            days.append(found[0].days)
    return counts, days
