"""plan/inference.py: KV cache (from accounting), GPUs needed, decode bounds, cost."""

from __future__ import annotations

import pytest

from moetron.config import get_preset
from moetron.model.accounting import kv_bytes_per_token, param_counts
from moetron.plan.hardware import get_accelerator
from moetron.plan.inference import (
    HOURS_PER_MONTH,
    InferencePlanError,
    gpus_needed,
    kv_cache_bytes,
    plan_inference,
)

H100 = get_accelerator("h100")


def test_kv_cache_comes_from_accounting_and_mqa_is_stored_per_tp_rank() -> None:
    gpt4, mixtral = get_preset("gpt4"), get_preset("mixtral-8x7b")
    assert kv_cache_bytes(gpt4, 32_768) == 32_768 * kv_bytes_per_token(gpt4) == 32_768 * 61_440
    mqa = plan_inference(gpt4, get_accelerator("a100-80gb"), 32_768, num_gpus=128)
    gqa = plan_inference(mixtral, H100, 32_768, num_gpus=8)
    assert (mqa.tp, mqa.pp, mqa.kv_copies) == (8, 16, 8)  # one KV head, 8 GPUs per stage each keep it
    assert gqa.kv_copies == 1  # 8 KV heads over 8-way TP: one each
    assert mqa.kv_bytes_per_sequence == 8 * kv_cache_bytes(gpt4, 32_768)


def test_gpus_needed_grows_with_concurrency_and_context() -> None:
    cfg = get_preset("mixtral-8x7b")
    assert gpus_needed(cfg, H100, 1, 4096, "bf16") == 2  # 93 GB of bf16 weights
    assert gpus_needed(cfg, H100, 1, 4096, "int4") == 1
    counts = [gpus_needed(cfg, H100, c, 32_768, "bf16") for c in (1, 64, 256, 1024)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_decode_is_the_slower_of_memory_and_compute_and_cost_follows() -> None:
    plan = plan_inference(get_preset("mixtral-8x7b"), H100, 8192, num_gpus=8, concurrency=64)
    assert plan.tokens_per_s == pytest.approx(
        min(plan.tokens_per_s_memory_bound, plan.tokens_per_s_compute_bound), rel=0.01
    )
    assert plan.monthly_cost_usd == pytest.approx(8 * H100.price.usd_per_gpu_hour * HOURS_PER_MONTH)
    assert plan.cost_per_million_tokens_usd == pytest.approx(
        plan.usd_per_hour / (plan.tokens_per_s * 3600) * 1e6
    )
    # single-sequence decode of a dense-ish model on 8 GPUs is bandwidth bound
    one = plan_inference(get_preset("mixtral-8x7b"), H100, 8192, num_gpus=8, concurrency=1)
    assert one.tokens_per_s_memory_bound < one.tokens_per_s_compute_bound
    assert plan.tokens_per_s > 10 * one.tokens_per_s  # batching amortises the weight reads


def test_memory_fits_what_was_asked() -> None:
    cfg = get_preset("gpt4")
    plan = plan_inference(cfg, get_accelerator("a100-80gb"), 32_768, num_gpus=128)
    assert plan.concurrency == plan.max_concurrency > 0
    assert plan.memory_per_gpu_bytes <= get_accelerator("a100-80gb").usable_memory_bytes
    assert plan.weights_bytes == 2 * param_counts(cfg).total
    with pytest.raises(InferencePlanError, match="not 1000; 272 GPUs would"):
        plan_inference(cfg, get_accelerator("a100-80gb"), 32_768, num_gpus=128, concurrency=1000)
    with pytest.raises(InferencePlanError, match="do not fit on any cluster"):
        plan_inference(cfg, get_accelerator("a100-80gb"), 32_768, num_gpus=128, concurrency=10_000)
    with pytest.raises(InferencePlanError, match="max_seq_len"):
        plan_inference(get_preset("tiny"), H100, 100_000)
