"""plan/training.py: step-time terms, failures, and the layout search."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moetron.config import get_preset
from moetron.plan.hardware import get_accelerator
from moetron.plan.memory import PRECISIONS, Layout
from moetron.plan.search import search
from moetron.plan.training import Reliability, TrainingJob, estimate, failures


def _job(model: str = "mixtral-8x7b", gpus: int = 256, **kw) -> TrainingJob:
    defaults = dict(
        cfg=get_preset(model),
        device=get_accelerator("h100"),
        num_gpus=gpus,
        tokens=1e12,
        seq_len=4096,
        batch_tokens=8 * 2**20,
        precision=PRECISIONS["bf16"],
    )
    return TrainingJob(**{**defaults, **kw})


def test_pipeline_bubble_is_p_minus_1_over_v_m() -> None:
    job = _job(gpus=64)
    for v in (1, 2):
        e = estimate(job, Layout(tp=8, pp=4, dp=2, recompute="selective", virtual_stages=v))
        m = e.num_microbatches
        per_microbatch = (
            e.step.compute + e.step.memory_bound + e.step.tensor_parallel + e.step.pipeline_p2p
        ) / m
        assert e.step.bubble == pytest.approx((4 - 1) / v * per_microbatch)


def test_no_parallelism_means_no_communication() -> None:
    job = _job("small", gpus=1, seq_len=1024, batch_tokens=8 * 1024)
    e = estimate(job, Layout(tp=1, pp=1, dp=1, zero=0))
    assert e.step.tensor_parallel == e.step.expert_parallel == e.step.data_parallel == e.step.bubble == 0
    assert 0 < e.mfu <= job.device.matmul_efficiency


def test_tensor_parallel_time_grows_with_tp() -> None:
    job = _job(gpus=64)
    times = [estimate(job, Layout(tp=t, pp=1, dp=64 // t, zero=3)).step.tensor_parallel for t in (1, 2, 4, 8)]
    assert times[0] == 0 and times[1] < times[2] < times[3]


def test_expert_all_to_all_crossing_nodes_costs_more_and_overlap_hides_it() -> None:
    job = _job(gpus=64)
    inside = estimate(job, Layout(tp=1, pp=1, dp=64, ep=8)).step.expert_parallel  # one node
    assert inside > 0
    job16 = _job(
        gpus=64,
        cfg=dataclasses.replace(
            get_preset("mixtral-8x7b"),
            moe=dataclasses.replace(get_preset("mixtral-8x7b").moe, num_experts=16),
        ),
    )
    across = estimate(job16, Layout(tp=1, pp=1, dp=64, ep=16)).step.expert_parallel
    assert across > inside
    hidden = estimate(dataclasses.replace(job16, ep_overlap=1.0), Layout(tp=1, pp=1, dp=64, ep=16))
    assert hidden.step.expert_parallel == 0


def test_full_recompute_costs_a_forward_and_mfu_excludes_it() -> None:
    job = _job(gpus=64)
    sel = estimate(job, Layout(tp=8, pp=1, dp=8, recompute="selective"))
    full = estimate(job, Layout(tp=8, pp=1, dp=8, recompute="full"))
    assert full.step.compute > 1.25 * sel.step.compute
    assert full.hfu > full.mfu and full.mfu < sel.mfu


def test_young_daly_interval_and_overhead_grow_with_the_cluster() -> None:
    job = _job(reliability=Reliability(async_checkpoint=False))
    small, large = failures(job, 1024), failures(job, 16384)
    assert large.cluster_mtbf_hours == pytest.approx(small.cluster_mtbf_hours / 16)
    assert large.overhead > small.overhead > 0
    # blocking checkpoints: tau = sqrt(2 * delta * M), Young 1974
    mtbf_s = small.cluster_mtbf_hours * 3600
    assert small.checkpoint_interval_minutes * 60 == pytest.approx(
        max(math.sqrt(2 * small.checkpoint_pause_seconds * mtbf_s), small.checkpoint_pause_seconds)
    )
    asynchronous = failures(dataclasses.replace(job, reliability=Reliability()), 16384)
    assert asynchronous.overhead < large.overhead


def test_search_returns_fitting_layouts_fastest_first() -> None:
    job = _job(gpus=128)
    found = search(job, keep=5)
    assert len(found) == 5
    assert [e.days for e in found] == sorted(e.days for e in found)
    for e in found:
        assert e.memory.total <= job.device.usable_memory_bytes
        assert e.layout.world <= 128
        assert e.batch_sequences * job.seq_len <= 1.1 * job.batch_tokens


def test_search_keeps_fixed_fields_and_more_gpus_train_faster() -> None:
    fixed = search(_job(gpus=128, fixed=(("tp", 4), ("recompute", "full"))), keep=3)
    assert fixed and all(e.layout.tp == 4 and e.layout.recompute == "full" for e in fixed)
    days = [search(_job(gpus=g), keep=1)[0].days for g in (64, 256, 1024)]
    assert days[0] > days[1] > days[2]


def test_search_is_empty_when_nothing_fits() -> None:
    assert search(_job("gpt4", gpus=8, seq_len=8192)) == []
