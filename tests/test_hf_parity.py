"""Logit parity with transformers' MixtralForCausalLM on the same weights, both directions.

Tolerance: max |Δlogit| ≤ 1e-4 in float32 (the two implementations sum in different orders).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moetron
from moetron.config import ModelConfig, MoEConfig, RopeConfig
from moetron.convert.hf import save_pretrained
from moetron.model import Transformer

ATOL = 1e-4
# transformers' per-expert loop: the plainest reference, and its grouped_mm default rejects odd
# widths on CPU ("strides should be multiple of 16 bytes").
HF_KWARGS = {"dtype": torch.float32, "experts_implementation": "eager", "attn_implementation": "eager"}

# (name, ModelConfig) covering MHA/GQA/MQA, top-1/2/3, tied/untied, odd sizes, RoPE scalings.
CASES = {
    "mha-top2": ModelConfig(
        vocab_size=97, dim=48, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=40),
    ),
    "gqa-top1-tied": ModelConfig(
        vocab_size=131, dim=40, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64, tie_embeddings=True,
        moe=MoEConfig(num_experts=5, top_k=1, expert_hidden_dim=24),
    ),
    "mqa-top3-odd": ModelConfig(
        vocab_size=61, dim=36, num_layers=2, num_heads=6, num_kv_heads=1, head_dim=10, max_seq_len=64,
        rope=RopeConfig(theta=5e5),
        moe=MoEConfig(num_experts=7, top_k=3, expert_hidden_dim=17),
    ),
    "gqa-linear-rope": ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
        rope=RopeConfig(scaling="linear", factor=2.0),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=32),
    ),
    "mqa-yarn-16-experts": ModelConfig(
        vocab_size=80, dim=32, num_layers=2, num_heads=4, num_kv_heads=1, max_seq_len=256,
        rope=RopeConfig(theta=1e4, scaling="yarn", factor=4.0, original_max_seq_len=64),
        moe=MoEConfig(num_experts=16, top_k=2, expert_hidden_dim=16),
    ),
}  # fmt: skip


def _random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer.from_config(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(cfg: ModelConfig, length: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (2, length), generator=gen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_moetron_to_transformers(case: str, tmp_path) -> None:
    cfg = CASES[case]
    ours = _random_model(cfg)
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    hf = MixtralForCausalLM.from_pretrained(tmp_path, **HF_KWARGS).eval()
    ids = _inputs(cfg)
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), hf(ids).logits
    assert ours_logits.shape == (2, ids.shape[1], cfg.vocab_size)
    assert (ours_logits - hf_logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_to_moetron(case: str, tmp_path) -> None:
    cfg = CASES[case]
    torch.manual_seed(2)
    hf_cfg = MixtralConfig(**_hf_kwargs(cfg))
    hf = MixtralForCausalLM(hf_cfg).eval()
    hf.set_experts_implementation("eager")
    hf.save_pretrained(tmp_path)
    ours = moetron.from_pretrained(tmp_path)
    assert ours.cfg.moe.top_k == cfg.moe.top_k and ours.cfg.num_kv_heads == cfg.num_kv_heads
    ids = _inputs(cfg)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= ATOL


def _hf_kwargs(cfg: ModelConfig) -> dict:
    """An independent spelling of the config in transformers' own terms (not via our converter)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope.theta}
    if cfg.rope.scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": cfg.rope.theta, "factor": cfg.rope.factor}
    elif cfg.rope.scaling == "yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope.theta,
            "factor": cfg.rope.factor,
            "original_max_position_embeddings": cfg.rope.original_max_seq_len,
        }
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.moe.expert_hidden_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
    )


def test_round_trip_preserves_every_tensor(tmp_path) -> None:
    cfg = CASES["gqa-top1-tied"]
    ours = _random_model(cfg)
    save_pretrained(ours, tmp_path / "a")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "a", **HF_KWARGS)
    hf.save_pretrained(tmp_path / "b")  # transformers writes it back in its own way
    back = moetron.from_pretrained(tmp_path / "b")
    assert back.cfg.tie_embeddings
    assert back.output.weight.data_ptr() == back.tok_embeddings.weight.data_ptr()
    for (name, p), (name_b, q) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(p, q), name


def test_sharded_checkpoint_loads_in_both(tmp_path) -> None:
    cfg = CASES["mha-top2"]
    ours = _random_model(cfg)
    save_pretrained(ours, tmp_path, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    ids = _inputs(cfg)
    hf = MixtralForCausalLM.from_pretrained(tmp_path, **HF_KWARGS).eval()
    with torch.no_grad():
        expected = ours(ids)
        assert (hf(ids).logits - expected).abs().max().item() <= ATOL
        assert torch.equal(moetron.from_pretrained(tmp_path)(ids), expected)
    # re-saving unsharded removes the stale shards and index
    save_pretrained(ours, tmp_path)
    assert (
        not list(tmp_path.glob("model-*.safetensors"))
        and not (tmp_path / "model.safetensors.index.json").exists()
    )


def test_fused_transformers_v5_expert_layout_loads(tmp_path) -> None:
    """transformers ≥ 5 holds experts fused ([E, 2I, D] gate_up, [E, D, I] down); accept that on disk."""
    from safetensors.torch import save_file

    cfg = CASES["mha-top2"]
    torch.manual_seed(3)
    hf = MixtralForCausalLM(MixtralConfig(**_hf_kwargs(cfg))).eval()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    ours = moetron.from_pretrained(tmp_path)
    ids = _inputs(cfg)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= ATOL


def test_moetron_only_features_round_trip(tmp_path) -> None:
    """Shared experts, dense first layers and un-normalised top-k: not expressible as Mixtral, so
    written as MoetronForCausalLM and reloaded exactly."""
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=1, max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, normalize_top_k=False,
                      num_shared_experts=1, num_dense_layers=1, z_loss_weight=0.01),
    )  # fmt: skip
    ours = _random_model(cfg)
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MoetronForCausalLM"]
    back = moetron.from_pretrained(tmp_path)
    assert back.cfg == cfg
    ids = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


def test_bf16_checkpoint_keeps_dtype(tmp_path) -> None:
    cfg = CASES["mha-top2"]
    ours = _random_model(cfg).to(torch.bfloat16)
    save_pretrained(ours, tmp_path)
    hf = MixtralForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    back = moetron.from_pretrained(tmp_path)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    assert moetron.from_pretrained(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32
    ids = _inputs(cfg, 8)
    with torch.no_grad():
        logits = back(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
