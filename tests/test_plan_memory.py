"""plan/memory.py: Korthikanti's activation count for moetron's block, ZeRO bytes, monotonicity."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from moetron.config import ModelConfig, MoEConfig, get_preset
from moetron.model.accounting import param_counts
from moetron.plan.memory import PRECISIONS, Layout, layer_activation_elements, memory_per_gpu, stage_layers
from moetron.plan.published import gpt3_175b

BF16 = PRECISIONS["bf16"]


def test_activations_match_korthikanti_without_dropout() -> None:
    """GPT-3's shape (MHA, SwiGLU of 8d/3 = GELU of 4d): Korthikanti et al. 2022 count
    s·b·h·(34 + 5·a·s/h) bytes per layer. moetron has no dropout: minus the two 1-byte masks (2)
    and the dropout mask + output on the probabilities (3·a·s/h) that leaves 32 + 2·a·s/h."""
    cfg = gpt3_175b()
    s, h, a = 2048, cfg.dim, cfg.num_heads
    none = 2 * layer_activation_elements(cfg, 0, s, "none", tp=1, ep=1)
    selective = 2 * layer_activation_elements(cfg, 0, s, "selective", tp=1, ep=1)
    assert none == pytest.approx(h * (32 + 2 * a * s / h))
    assert selective == pytest.approx(32 * h)
    # with sequence + tensor parallelism every term divides by t (Korthikanti eq. 4)
    assert 2 * layer_activation_elements(cfg, 0, s, "none", tp=8, ep=1) == pytest.approx(none / 8)
    assert 2 * layer_activation_elements(cfg, 0, s, "full", tp=8, ep=1) == pytest.approx(2 * h / 8)


def test_one_gpu_holds_16_bytes_per_parameter_plus_activations() -> None:
    cfg = get_preset("small")
    mem = memory_per_gpu(cfg, Layout(tp=1, pp=1, dp=1, zero=0), 256, 1, BF16)
    total = param_counts(cfg).total
    assert mem.weights + mem.gradients + mem.optimizer == pytest.approx(16 * total)
    assert mem.activations > 0 and mem.logits == pytest.approx(256 * cfg.vocab_size * (2 + 8))


@pytest.fixture(scope="module")
def big() -> ModelConfig:
    return get_preset("mixtral-8x7b")


def _mem(cfg: ModelConfig, **kw):
    layout = Layout(**{"tp": 1, "pp": 1, "dp": 8, "ep": 1, "zero": 1, **kw})
    return memory_per_gpu(cfg, layout, 4096, 8, BF16)


def test_recompute_lowers_activations(big: ModelConfig) -> None:
    none, selective, full = (_mem(big, recompute=r).activations for r in ("none", "selective", "full"))
    assert none > selective > full > 0


@pytest.mark.parametrize("field, values", [("tp", (1, 2, 4, 8)), ("pp", (1, 2, 4, 8)), ("ep", (1, 2, 4, 8))])
def test_more_model_parallelism_lowers_weights_per_gpu(big: ModelConfig, field: str, values) -> None:
    weights = [_mem(big, **{field: v}).weights for v in values]
    assert all(a > b for a, b in itertools.pairwise(weights)), weights


def test_zero_stages_shard_more_and_more(big: ModelConfig) -> None:
    stages = [_mem(big, zero=z) for z in (0, 1, 2, 3)]
    assert stages[0].optimizer > stages[1].optimizer == stages[2].optimizer
    assert stages[1].gradients > stages[2].gradients
    assert stages[2].weights > stages[3].weights
    assert [m.total for m in stages] == sorted((m.total for m in stages), reverse=True)


def test_tp_beyond_kv_heads_keeps_a_copy_per_gpu() -> None:
    mqa = get_preset("gpt4")  # one KV head
    k_and_v = 2 * mqa.head_dim
    with_8 = layer_activation_elements(mqa, 0, 8192, "selective", tp=8, ep=1)
    attention_8 = (2 * mqa.dim + 2 * mqa.num_heads * mqa.head_dim) / 8
    moe = mqa.moe
    ffn_8 = (2 * mqa.dim + 4 * moe.num_experts + moe.top_k * (2 * mqa.dim + 3 * moe.expert_hidden_dim)) / 8
    assert with_8 == pytest.approx(attention_8 + k_and_v + ffn_8)


def test_first_pipeline_stage_holds_the_most_activations(big: ModelConfig) -> None:
    layout = Layout(tp=1, pp=4, dp=2, recompute="selective")
    mem = memory_per_gpu(big, layout, 4096, 16, BF16)
    assert mem.stage == 0  # 4 microbatches in flight there, 1 on the last stage
    interleaved = memory_per_gpu(big, dataclasses.replace(layout, virtual_stages=2), 4096, 16, BF16)
    assert interleaved.activations > mem.activations


def test_stage_layers_split_evenly() -> None:
    assert [len(r) for r in stage_layers(126, 16)] == [8] * 14 + [7] * 2
    assert sum(len(r) for r in stage_layers(7, 3)) == 7


def test_capacity_factor_scales_expert_activations() -> None:
    base = get_preset("tiny")
    capped = dataclasses.replace(
        base, moe=MoEConfig(**{**dataclasses.asdict(base.moe), "capacity_factor": 2.0})
    )
    assert layer_activation_elements(capped, 1, 128, "selective", 1, 1) > layer_activation_elements(
        base, 1, 128, "selective", 1, 1
    )
