"""model/accounting.py against the instantiated module: parameter counts, KV bytes, FLOPs.

The counts are checked on modules built on the meta device, so even the 1.8T-parameter preset
costs no memory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moetron.config import PRESETS, ModelConfig, MoEConfig, get_preset
from moetron.model import Transformer
from moetron.model.accounting import (
    active_params,
    attention_flops_per_token,
    executed_train_flops_per_token,
    forward_flops_per_token,
    kv_bytes_per_token,
    param_counts,
    total_params,
    train_flops_per_token,
)
from moetron.model.moe import MoELayer


def _odd(**overrides) -> ModelConfig:
    base = {"vocab_size": 300, "dim": 48, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2}
    moe = overrides.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40))
    return ModelConfig(**{**base, **overrides}, moe=moe)


ODD_CONFIGS = {
    "tied": _odd(tie_embeddings=True),
    "shared-experts": _odd(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40, num_shared_experts=2)),
    "shared-experts-own-width": _odd(
        moe=MoEConfig(
            num_experts=4, top_k=1, expert_hidden_dim=40, num_shared_experts=1, shared_expert_hidden_dim=56
        )
    ),
    "dense-first": _odd(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40, num_dense_layers=2)),
    "dense-first-own-width": _odd(
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40, num_dense_layers=1, dense_hidden_dim=72)
    ),
    "all-dense": _odd(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40, num_dense_layers=3)),
    "mha": _odd(num_kv_heads=4),
    "gqa": _odd(num_heads=6, num_kv_heads=3),
    "mqa": _odd(num_kv_heads=1),
    "head-dim-not-dim-over-heads": _odd(head_dim=20),
    "top-k-equals-experts": _odd(moe=MoEConfig(num_experts=3, top_k=3, expert_hidden_dim=40)),
    "everything": _odd(
        tie_embeddings=True,
        num_heads=6,
        num_kv_heads=2,
        head_dim=10,
        moe=MoEConfig(
            num_experts=5,
            top_k=3,
            expert_hidden_dim=24,
            num_shared_experts=2,
            shared_expert_hidden_dim=16,
            num_dense_layers=1,
            dense_hidden_dim=36,
            capacity_factor=1.5,
        ),
    ),
}
ALL_CONFIGS = {**{name: make() for name, make in PRESETS.items()}, **ODD_CONFIGS}


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _active_from_module(model: Transformer) -> int:
    """Everything except the (E - K) / E share of each MoE layer's routed experts a token skips."""
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for layer in model.layers:
        if isinstance(layer.ffn, MoELayer):
            num_experts, top_k = layer.ffn.cfg.num_experts, layer.ffn.cfg.top_k
            routed = sum(p.numel() for p in layer.ffn.experts.parameters())
            assert routed % num_experts == 0
            skipped += routed // num_experts * (num_experts - top_k)
    return total - skipped


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_param_counts_match_module(name: str) -> None:
    cfg = ALL_CONFIGS[name]
    model = _meta_model(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == _active_from_module(model)
    assert total_params(cfg) == counts.total
    assert active_params(cfg) == counts.active


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_param_count_parts_match_modules(name: str) -> None:
    cfg = ALL_CONFIGS[name]
    model = _meta_model(cfg)
    counts = param_counts(cfg)

    def numel(modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    moe_layers = list(model.moe_layers())
    dense_ffns = [layer.ffn for layer in model.layers if not isinstance(layer.ffn, MoELayer)]
    norms = [model.norm] + [n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
    assert counts.embedding == model.tok_embeddings.weight.numel()
    assert counts.output == (0 if cfg.tie_embeddings else model.output.weight.numel())
    assert counts.attention == numel(layer.attention for layer in model.layers)
    assert counts.norms == numel(norms)
    assert counts.router == numel(m.router for m in moe_layers)
    assert counts.routed_experts == numel(m.experts for m in moe_layers)
    assert counts.shared_experts == numel(
        m.shared_experts for m in moe_layers if m.shared_experts is not None
    )
    assert counts.dense_ffn == numel(dense_ffns)
    assert counts.active_non_embedding == counts.active - counts.embedding - counts.output


def test_tied_embeddings_count_once() -> None:
    untied, tied = param_counts(_odd()), param_counts(_odd(tie_embeddings=True))
    assert untied.total - tied.total == 300 * 48
    assert tied.output == 0


def test_top_k_equal_to_num_experts_is_all_active() -> None:
    counts = param_counts(ODD_CONFIGS["top-k-equals-experts"])
    assert counts.active == counts.total


# --- KV cache


def test_kv_bytes_mqa_vs_mha() -> None:
    mha, gqa, mqa = (ModelConfig(dim=512, num_layers=8, num_heads=8, num_kv_heads=g) for g in (8, 2, 1))
    # K and V, per layer, per kv head, head_dim 64, bf16.
    assert kv_bytes_per_token(mha) == 2 * 8 * 8 * 64 * 2
    assert kv_bytes_per_token(mha) == 8 * kv_bytes_per_token(mqa)
    assert kv_bytes_per_token(gqa) == 2 * kv_bytes_per_token(mqa)
    assert kv_bytes_per_token(mqa, bytes_per_element=4) == 2 * kv_bytes_per_token(mqa)
    # GPT-4 preset: MQA with 128-wide heads over 120 layers.
    assert kv_bytes_per_token(get_preset("gpt4")) == 2 * 120 * 1 * 128 * 2


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa", "head-dim-not-dim-over-heads"])
def test_kv_bytes_match_what_attention_produces(name: str) -> None:
    """Sum the K and V tensors every layer hands to its attention backend."""
    cfg = ODD_CONFIGS[name]
    model = Transformer.from_config(cfg).eval()
    kv_bytes, layer_ids = [], []

    def recording_backend(q_BHTd, k_BGTd, v_BGTd, layer_id):
        layer_ids.append(layer_id)
        kv_bytes.append(k_BGTd.numel() * k_BGTd.element_size() + v_BGTd.numel() * v_BGTd.element_size())
        return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=True)

    B, T = 2, 5
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, T)), attention_backend=recording_backend)
    assert layer_ids == list(range(cfg.num_layers))  # each layer tells the backend its index
    assert sum(kv_bytes) == B * T * kv_bytes_per_token(cfg, bytes_per_element=4)


# --- FLOPs


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_forward_flops_are_two_per_active_weight_plus_attention(name: str) -> None:
    cfg = ALL_CONFIGS[name]
    counts = param_counts(cfg)
    seq_len = 1024
    # The embedding lookup is free; the output head is a matmul even when tied to it.
    head = cfg.vocab_size * cfg.dim
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len / 2)
    expected = 2 * (counts.active - counts.embedding - counts.output + head) + attention
    assert forward_flops_per_token(cfg, seq_len) == pytest.approx(expected, rel=1e-12)
    assert attention_flops_per_token(cfg, seq_len) == pytest.approx(attention, rel=1e-12)
    assert attention_flops_per_token(cfg, seq_len, causal=False) == pytest.approx(2 * attention, rel=1e-12)
    assert train_flops_per_token(cfg, seq_len) == pytest.approx(3 * expected, rel=1e-12)


def test_executed_train_flops_count_only_the_pairs_a_capacity_keeps() -> None:
    """The trainer's MFU numerator: below capacity factor 1 the routed experts run on at most that
    fraction of the top-k pairs; at 1 and above, and dropless, all of them (the dense model's count)."""
    base = get_preset("small")
    seq_len = 256
    full = train_flops_per_token(base, seq_len)
    experts = 6 * param_counts(base).active_routed_experts  # fwd + bwd FLOPs of the routed experts
    for capacity, kept in ((None, 1.0), (1.0, 1.0), (1.25, 1.0), (0.75, 0.75), (0.5, 0.5)):
        cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, capacity_factor=capacity))
        assert executed_train_flops_per_token(cfg, seq_len) == pytest.approx(
            full - experts * (1 - kept), rel=1e-12
        )


def _naive_attention(q_BHTd, k_BGTd, v_BGTd, layer_id):
    """Full (unmasked-cost) matmul attention, so the FLOP counter sees QK^T and AV."""
    repeat = q_BHTd.shape[1] // k_BGTd.shape[1]
    k_BHTd, v_BHTd = k_BGTd.repeat_interleave(repeat, 1), v_BGTd.repeat_interleave(repeat, 1)
    scores = q_BHTd @ k_BHTd.transpose(-1, -2) / q_BHTd.shape[-1] ** 0.5
    T = q_BHTd.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_BHTd


@pytest.mark.parametrize("name", ["tied", "mqa", "shared-experts", "dense-first", "everything"])
def test_forward_flops_match_flop_counter(name: str) -> None:
    """Count the matmul FLOPs of a real (dropless) forward. The counter sees the full T×T score
    matrix, so compare with the non-causal attention term. Accounting also counts 2 FLOPs per norm
    weight (elementwise, not a matmul): that is the only, tiny, difference."""
    cfg = ODD_CONFIGS[name]
    model = Transformer.from_config(cfg).eval()
    B, T = 1, 16
    input_ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids, attention_backend=_naive_attention)
    measured = counter.get_total_flops()

    counts = param_counts(cfg)
    non_causal_per_token = (
        forward_flops_per_token(cfg, T)
        - attention_flops_per_token(cfg, T)
        + attention_flops_per_token(cfg, T, causal=False)
    )
    assert measured == pytest.approx(B * T * non_causal_per_token, rel=0.01)
    assert measured == B * T * (non_causal_per_token - 2 * counts.norms)
