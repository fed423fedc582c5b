"""Hugging Face config.json → ModelConfig *for accounting only* (parameter counts, FLOPs, KV bytes).

`convert/hf.py` converts what moetron can load weights for (Mixtral and moetron's own layout).
The planner also sizes models it will never load; their config.json maps here:

* Llama / Mistral / Qwen2 (dense): every layer is a dense SwiGLU of width intermediate_size
  (`num_dense_layers = num_hidden_layers`, so no router is counted and the count is exact).
  Qwen2's q/k/v biases (3 vectors per layer, <0.01% of the weights) are not counted. Mistral's
  sliding window is ignored: the KV cache is sized for the full context. RoPE scalings moetron
  cannot run (Llama 3.1's "llama3") are dropped: they change no count.
* Qwen2-MoE: num_experts × moe_intermediate_size routed experts, num_experts_per_tok chosen,
  plus one shared expert of shared_expert_intermediate_size. The shared expert's sigmoid gate (a
  d×1 vector per layer) and qkv biases are not counted. `mlp_only_layers` may list a prefix of
  layers (they become dense layers of intermediate_size); other layer patterns, and
  decoder_sparse_step > 1, are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moetron.config import ConfigError, ModelConfig, MoEConfig, RopeConfig
from moetron.convert.hf import MIXTRAL, MOETRON, CheckpointError, _rope_from_hf, from_hf_config

DENSE_TYPES = {"llama", "mistral", "qwen2"}
QWEN2_MOE = "qwen2_moe"


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "dim": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim"),
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "rope": _rope_or_plain(hf),
    }


def _rope_or_plain(hf: dict[str, Any]) -> RopeConfig:
    """RoPE changes no count; a scaling moetron cannot run (e.g. Llama 3.1's "llama3") is dropped."""
    try:
        return _rope_from_hf(hf)
    except (CheckpointError, ConfigError, KeyError, TypeError):
        return RopeConfig(theta=float(hf.get("rope_theta", 10_000.0)))


def _dense_moe(width: int, num_layers: int) -> MoEConfig:
    return MoEConfig(
        num_experts=1, top_k=1, expert_hidden_dim=width, num_dense_layers=num_layers, dense_hidden_dim=width
    )


def _qwen2_moe(hf: dict[str, Any]) -> MoEConfig:
    if hf.get("decoder_sparse_step", 1) != 1:
        raise CheckpointError(
            f"config.json: decoder_sparse_step={hf['decoder_sparse_step']} (MoE every n-th layer) is not supported"
        )
    dense_layers = sorted(hf.get("mlp_only_layers") or [])
    if dense_layers != list(range(len(dense_layers))):
        raise CheckpointError(
            f"config.json: mlp_only_layers={dense_layers} is supported only as a prefix [0, 1, ..., n-1]"
        )
    shared = hf.get("shared_expert_intermediate_size") or 0
    return MoEConfig(
        num_experts=hf["num_experts"],
        top_k=hf["num_experts_per_tok"],
        expert_hidden_dim=hf["moe_intermediate_size"],
        normalize_top_k=hf.get("norm_topk_prob", False),
        num_shared_experts=1 if shared else 0,
        shared_expert_hidden_dim=shared or None,
        num_dense_layers=len(dense_layers),
        dense_hidden_dim=hf["intermediate_size"] if dense_layers else None,
        aux_loss_weight=hf.get("router_aux_loss_coef", 0.01),
    )


def shape_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig with the same parameter counts, FLOPs and KV bytes as an HF config."""
    architectures = hf.get("architectures") or [hf.get("model_type", "?")]
    model_type = hf.get("model_type", "")
    if architectures[0] in (MIXTRAL, MOETRON) or model_type == "mixtral":
        return from_hf_config({**hf, "sliding_window": None})  # window ignored, as for Mistral
    try:
        if model_type in DENSE_TYPES:
            moe = _dense_moe(hf["intermediate_size"], hf["num_hidden_layers"])
        elif model_type == QWEN2_MOE:
            moe = _qwen2_moe(hf)
        else:
            supported = ", ".join(sorted({*DENSE_TYPES, QWEN2_MOE, "mixtral", "moetron"}))
            raise CheckpointError(
                f"config.json: model_type {model_type!r} is not supported for planning (supported: {supported})"
            )
        return ModelConfig(**_common(hf), moe=moe)
    except KeyError as e:
        raise CheckpointError(f"config.json: required field {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None


def shape_notes(hf: dict[str, Any]) -> tuple[str, ...]:
    """What the ModelConfig from `shape_config_from_hf` leaves out, in words."""
    model_type = hf.get("model_type", "")
    notes = []
    if model_type in ("qwen2", QWEN2_MOE):
        notes.append("Qwen2 q/k/v biases (3 vectors per layer, <0.01% of the weights) are not counted")
    if model_type == QWEN2_MOE:
        notes.append("the shared expert's sigmoid gate (one d-vector per layer) is not counted")
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        notes.append(
            f"sliding window {hf['sliding_window']} ignored: the KV cache is sized for the full context"
        )
    if model_type in DENSE_TYPES:
        notes.append("dense: every layer is a SwiGLU of intermediate_size (no router counted)")
    return tuple(notes)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The JSON of a config.json file (or of a directory holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data


def load_shape_config(path: str | Path) -> ModelConfig:
    return shape_config_from_hf(read_hf_config(path))
