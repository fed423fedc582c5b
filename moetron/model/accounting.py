"""Parameter counts, FLOPs and KV-cache bytes: pure functions of a ModelConfig.

The single home of these formulas: the planner, the trainer's MFU and the engine's KV-pool sizing
all call them, and a test checks the counts against the instantiated module.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetron.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by part. `active` counts what one token touches (top_k routed experts)."""

    embedding: int
    output: int  # 0 when tied to the embedding
    attention: int  # all layers, projections only
    norms: int
    router: int
    routed_experts: int  # all experts of all MoE layers
    active_routed_experts: int  # top_k experts of all MoE layers
    shared_experts: int
    dense_ffn: int

    @property
    def total(self) -> int:
        return (
            self.embedding + self.output + self.attention + self.norms + self.router
            + self.routed_experts + self.shared_experts + self.dense_ffn
        )  # fmt: skip

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.active_routed_experts

    @property
    def active_non_embedding(self) -> int:
        """Weights that do matmuls per token besides the output head (for FLOPs)."""
        return self.active - self.embedding - self.output


def param_counts(cfg: ModelConfig) -> ParamCounts:
    moe, d = cfg.moe, cfg.dim
    q_and_o = 2 * d * cfg.num_heads * cfg.head_dim
    k_and_v = 2 * d * cfg.num_kv_heads * cfg.head_dim
    swiglu = 3 * d  # parameters per unit of hidden width
    L, L_moe, L_dense = cfg.num_layers, cfg.num_moe_layers, cfg.moe.num_dense_layers
    return ParamCounts(
        embedding=cfg.vocab_size * d,
        output=0 if cfg.tie_embeddings else cfg.vocab_size * d,
        attention=L * (q_and_o + k_and_v),
        norms=(2 * L + 1) * d,
        router=L_moe * d * moe.num_experts,
        routed_experts=L_moe * moe.num_experts * swiglu * moe.expert_hidden_dim,
        active_routed_experts=L_moe * moe.top_k * swiglu * moe.expert_hidden_dim,
        shared_experts=L_moe * swiglu * moe.num_shared_experts * moe.shared_expert_hidden_dim,
        dense_ffn=L_dense * swiglu * moe.dense_hidden_dim,
    )


def total_params(cfg: ModelConfig) -> int:
    return param_counts(cfg).total


def active_params(cfg: ModelConfig) -> int:
    return param_counts(cfg).active


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of QK^T and AV for one token, averaged over a sequence of `seq_len`."""
    context = seq_len / 2 if causal else seq_len  # mean keys attended under a causal mask
    return 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """2 FLOPs per active weight (embedding lookup excluded, output head included) + attention."""
    counts = param_counts(cfg)
    matmul_params = counts.active_non_embedding + cfg.vocab_size * cfg.dim
    return 2 * matmul_params + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (backward ≈ 2× forward), no recomputation."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def executed_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """train_flops_per_token as a training step computes it: with a capacity factor below 1, each
    expert keeps at most that fraction of its mean load, so the routed experts run on at most
    capacity_factor x top_k pairs per token (dropped pairs cost nothing). The trainer's MFU."""
    flops = train_flops_per_token(cfg, seq_len)
    capacity = cfg.moe.capacity_factor
    if capacity is not None and capacity < 1:
        flops -= 3 * 2 * param_counts(cfg).active_routed_experts * (1 - capacity)
    return flops


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """KV-cache bytes one token occupies across all layers (GQA/MQA aware)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_element


# --- Per layer (the planner splits the model into pipeline stages). The per-layer parts sum to the
# whole-model figures above; tests/test_plan_accounting.py checks that.


def layer_param_counts(cfg: ModelConfig, layer_id: int) -> ParamCounts:
    """Parameters of transformer block `layer_id` alone (no embedding, output head or final norm)."""
    if not 0 <= layer_id < cfg.num_layers:
        raise ValueError(f"layer_id={layer_id} must lie in [0, num_layers={cfg.num_layers})")
    whole, moe = param_counts(cfg), cfg.moe
    is_moe = cfg.is_moe_layer(layer_id)
    return ParamCounts(
        embedding=0,
        output=0,
        attention=whole.attention // cfg.num_layers,
        norms=2 * cfg.dim,
        router=cfg.dim * moe.num_experts if is_moe else 0,
        routed_experts=whole.routed_experts // cfg.num_moe_layers if is_moe else 0,
        active_routed_experts=whole.active_routed_experts // cfg.num_moe_layers if is_moe else 0,
        shared_experts=whole.shared_experts // cfg.num_moe_layers if is_moe else 0,
        dense_ffn=0 if is_moe else whole.dense_ffn // moe.num_dense_layers,
    )


def layer_forward_flops_per_token(cfg: ModelConfig, layer_id: int, seq_len: int) -> float:
    """Forward FLOPs of one block for one token: its share of forward_flops_per_token."""
    attention = attention_flops_per_token(cfg, seq_len) / cfg.num_layers
    return 2 * layer_param_counts(cfg, layer_id).active + attention


def head_forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs after the last block: final norm and output projection."""
    return 2 * (cfg.dim + cfg.vocab_size * cfg.dim)
