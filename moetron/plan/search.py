"""Layout search: every (tp, pp, v, dp, ep, ZeRO, microbatch, recompute) worth trying on a cluster,
the ones that fit in memory ranked by wall-clock days (plan/training.py estimates each).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from moetron.config import ModelConfig
from moetron.plan.hardware import Accelerator
from moetron.plan.memory import (
    RECOMPUTE_MODES,
    Layout,
    StageShape,
    memory_per_gpu,
    num_microbatches,
    stage_shapes,
)
from moetron.plan.training import MAX_BATCH_ROUNDING, LayoutEstimate, TrainingJob, estimate


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_candidates(cfg: ModelConfig, device: Accelerator) -> list[int]:
    """Divisors of the head count that fit the scale-up domain (at most 64)."""
    limit = min(device.scale_up_size, 64)
    return [t for t in _divisors(cfg.num_heads) if t <= limit]


def pp_candidates(cfg: ModelConfig, limit: int) -> list[int]:
    """Divisors of the depth plus powers of two (uneven stages allowed, the longest sets the pace)."""
    powers = [2**k for k in range(8) if 2**k <= cfg.num_layers]
    return sorted({p for p in _divisors(cfg.num_layers) + powers if p <= min(limit, 128)})


def layouts(job: TrainingJob, gpus: int | None = None) -> Iterator[Layout]:
    """Every layout worth estimating on `gpus` devices (default: the job's). GPUs left over when
    tp·pp does not divide the count sit idle (and are still paid for)."""
    cfg = job.cfg
    gpus = gpus or job.num_gpus
    is_moe = cfg.num_moe_layers > 0 and cfg.moe.num_experts > 1
    for tp in tp_candidates(cfg, job.device):
        for pp in pp_candidates(cfg, gpus // tp):
            dp = gpus // (tp * pp)
            if dp < 1:
                continue
            eps = [e for e in _divisors(cfg.moe.num_experts) if dp % e == 0] if is_moe else [1]
            zeros = (1,) if pp > 1 else (1, 2, 3)
            if dp == 1:
                zeros = (0,)
            for ep in eps:
                for zero in zeros:
                    for microbatch in (1, 2, 4, 8, 16, 32):
                        if microbatch > max(1, math.ceil(job.batch_sequences / dp)):
                            break
                        for recompute in RECOMPUTE_MODES:
                            for v in (1, 2, 4, 8) if pp > 1 else (1,):
                                if v > math.ceil(cfg.num_layers / pp):
                                    break  # a virtual stage needs at least one layer
                                yield Layout(tp, pp, dp, ep, zero, microbatch, recompute, v)


def search(job: TrainingJob, gpus: int | None = None, keep: int = 5) -> list[LayoutEstimate]:
    """The `keep` fastest layouts that fit in memory, fastest first (empty if none fits)."""
    usable = job.device.usable_memory_bytes
    shapes: dict[int, list[StageShape]] = {}
    fitting: list[LayoutEstimate] = []
    for layout in layouts(job, gpus):
        if not job.allows(layout):
            continue
        m = num_microbatches(job.batch_sequences, layout)
        if layout.virtual_stages > 1 and m < layout.pp:
            continue  # interleaving needs at least pp microbatches in flight
        if layout.dp * m * layout.microbatch > MAX_BATCH_ROUNDING * job.batch_sequences:
            continue  # would change the optimisation problem, not just its speed
        if layout.pp not in shapes:
            shapes[layout.pp] = stage_shapes(job.cfg, layout.pp, job.seq_len)
        stages = shapes[layout.pp]
        memory = memory_per_gpu(job.cfg, layout, job.seq_len, m, job.precision, stages)
        if memory.total > usable:
            continue
        fitting.append(estimate(job, layout, stages, memory))
    fitting.sort(key=lambda e: (e.days, e.memory.total))
    return fitting[:keep]


def leanest_layout(job: TrainingJob, gpus: int) -> LayoutEstimate:
    """The layout needing the least memory per GPU on `gpus` devices (to explain a misfit)."""
    best = None
    for tp in tp_candidates(job.cfg, job.device)[-1:]:
        for pp in pp_candidates(job.cfg, gpus // tp):
            dp = gpus // (tp * pp)
            if dp < 1:
                continue
            is_moe = job.cfg.num_moe_layers > 0 and job.cfg.moe.num_experts > 1
            ep = (
                max((e for e in _divisors(job.cfg.moe.num_experts) if dp % e == 0), default=1)
                if is_moe
                else 1
            )
            zero = 0 if dp == 1 else (3 if pp == 1 else 1)
            candidate = estimate(job, Layout(tp, pp, dp, ep, zero, 1, "full", 1))
            if best is None or candidate.memory.total < best.memory.total:
                best = candidate
    if best is None:
        raise ValueError(f"no layout at all on {gpus} GPUs")
    return best


def smallest_cluster(job: TrainingJob, limit: int = 2**20) -> tuple[int, LayoutEstimate] | None:
    """The smallest power-of-two multiple of the node size on which some layout fits."""
    gpus = job.device.scale_up_size if job.device.scale_up_size <= 8 else 8
    while gpus <= limit:
        found = search(dataclasses.replace(job, num_gpus=gpus), keep=1)
        if found:
            return gpus, found[0]
        gpus *= 2
    return None
