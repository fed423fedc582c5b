"""Planner against published training runs: each figure side by side, with the relative error.

Each run is planned twice: with its published parallel layout fixed (this tests the step-time
and memory models) and with a free search (what the planner would recommend on that cluster).
docs/planner.md prints this table; tests/test_plan_validation.py holds the bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetron.model.accounting import attention_flops_per_token, param_counts, train_flops_per_token
from moetron.plan.hardware import get_accelerator
from moetron.plan.memory import PRECISIONS
from moetron.plan.published import PUBLISHED_RUNS, PublishedRun
from moetron.plan.search import search
from moetron.plan.training import LayoutEstimate, TrainingJob


@dataclass(frozen=True)
class Check:
    run: str
    figure: str
    published: float | tuple[float, float]
    planned: float
    how: str = ""  # which plan produced the figure

    @property
    def error(self) -> float:
        """Relative error; against a published range, the distance to its nearest end."""
        low, high = self.published if isinstance(self.published, tuple) else (self.published,) * 2
        if low <= self.planned <= high:
            return 0.0
        edge = low if self.planned < low else high
        return (self.planned - edge) / edge


def train_flops_6nd(run: PublishedRun) -> float:
    """The convention the papers use: training FLOPs without the attention term."""
    cfg = run.model_config()
    per_token = train_flops_per_token(cfg, run.seq_len) - 3 * attention_flops_per_token(cfg, run.seq_len)
    return per_token * run.tokens


def plan_run(run: PublishedRun, published_layout: bool) -> LayoutEstimate | None:
    if run.gpu is None or run.num_gpus is None:
        return None
    job = TrainingJob(
        cfg=run.model_config(),
        device=get_accelerator(run.gpu),
        num_gpus=run.num_gpus,
        tokens=run.tokens,
        seq_len=run.seq_len,
        batch_tokens=run.batch_tokens,
        precision=PRECISIONS[run.precision],
        ep_overlap=run.ep_overlap,
        fixed=run.layout if published_layout else (),
    )
    found = search(job, keep=1)
    return found[0] if found else None


def checks(runs: list[PublishedRun] = PUBLISHED_RUNS) -> list[Check]:
    out: list[Check] = []
    for run in runs:
        counts = param_counts(run.model_config())
        if run.total_params:
            out.append(Check(run.name, "total params", run.total_params, counts.total))
        if run.active_params:
            out.append(Check(run.name, "active params", run.active_params, counts.active))
        if run.flops:
            out.append(Check(run.name, "training FLOPs (6ND)", run.flops, train_flops_6nd(run)))
        fixed, free = plan_run(run, published_layout=True), plan_run(run, published_layout=False)
        for estimate, how in ((fixed, "published layout"), (free, "best layout found")):
            if estimate is None:
                continue
            how = f"{how}: {estimate.layout.describe()}"
            if run.mfu:
                out.append(Check(run.name, "MFU", run.mfu, estimate.mfu, how))
            if run.gpu_hours:
                out.append(Check(run.name, "GPU-hours", run.gpu_hours, estimate.gpu_hours, how))
            if run.days:
                out.append(Check(run.name, "days", run.days, estimate.days, how))
            if run.wall_mfu:
                # the described MFU is over the wall clock and counts 6ND FLOPs: compare alike
                cfg = run.model_config()
                share = train_flops_6nd(run) / (train_flops_per_token(cfg, run.seq_len) * run.tokens)
                planned = estimate.effective_mfu * share
                out.append(Check(run.name, "MFU over wall clock (6ND)", run.wall_mfu, planned, how))
    return out


def _format(value: float | tuple[float, float], figure: str) -> str:
    def one(v: float) -> str:
        if figure.startswith("MFU"):
            return f"{v:.1%}"
        if figure == "days":
            return f"{v:.1f}"
        if figure.endswith("params"):
            return f"{v / 1e9:,.1f}B"
        if figure == "GPU-hours":
            return f"{v / 1e6:.2f}M"
        return f"{v:.3g}"

    if isinstance(value, tuple):
        return one(value[0]) if value[0] == value[1] else f"{one(value[0])}–{one(value[1])}"
    return one(value)


def markdown_table(items: list[Check] | None = None) -> str:
    items = checks() if items is None else items
    lines = [
        "| run | figure | published | planner | error | planned with |",
        "|---|---|---|---|---|---|",
    ]
    for c in items:
        lines.append(
            f"| {c.run} | {c.figure} | {_format(c.published, c.figure)} | {_format(c.planned, c.figure)} "
            f"| {c.error:+.1%} | {c.how} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
