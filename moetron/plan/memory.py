"""Training memory per GPU: weights, gradients, optimizer states, activations.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4): count every tensor autograd keeps for the backward pass, per token and
per layer. Their GPT block stores s·b·h·(34 + 5·a·s/h) bytes; the same bookkeeping for moetron's
block (RMSNorm, GQA/MQA, SwiGLU, MoE, no dropout) is in `layer_activation_elements`. With
tensor parallelism we assume sequence parallelism, so every term divides by tp. Recompute modes:

* "none": the attention probabilities (a·s per token) are stored, Korthikanti's 5·a·s/h term;
* "selective": the attention core is recomputed (what FlashAttention does anyway);
* "full": only each layer's input is kept; one layer is rebuilt at a time during backward.

Bytes per parameter follow the ZeRO paper (Rajbhandari et al. 2020): mixed precision keeps 2 B
bf16 weights + 2 B bf16 gradients + 12 B optimizer state (fp32 master, Adam m and v); fp32
training keeps 4 + 4 + 8. ZeRO stage 1 shards the optimizer state over data parallelism, 2 also
the gradients, 3 (FSDP) also the weights. Expert parameters shard over the expert-data-parallel
group (dp / ep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from moetron.config import ModelConfig
from moetron.model.accounting import (
    head_forward_flops_per_token,
    layer_forward_flops_per_token,
    layer_param_counts,
    param_counts,
)

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")

# Expert-parallel ranks wait for the busiest one; with a load-balancing loss it carries about
# this much more than the mean (both in time and in activation memory).
MOE_IMBALANCE = 1.1


@dataclass(frozen=True)
class Precision:
    name: str
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # per parameter, all optimizer state incl. an fp32 master copy
    activation_bytes: int  # per stored activation element
    matmul_fp8: bool = False


PRECISIONS = {
    "bf16": Precision("bf16", 2, 2, 12, 2),
    "fp8": Precision("fp8", 2, 2, 12, 2, matmul_fp8=True),  # fp8 GEMMs, bf16 storage (DeepSeek-V3)
    "fp32": Precision("fp32", 4, 4, 8, 4),
}


@dataclass(frozen=True)
class Layout:
    """How a training job is split. world = tp * pp * dp; ep divides dp (experts are sharded
    over data-parallel ranks, Megatron/DeepSpeed-MoE style)."""

    tp: int
    pp: int
    dp: int
    ep: int = 1
    zero: int = 1
    microbatch: int = 1  # sequences per microbatch
    recompute: Recompute = "selective"
    virtual_stages: int = 1  # interleaved 1F1B chunks per pipeline rank

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        parts = [
            f"tp{self.tp}",
            f"pp{self.pp}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else ""),
        ]
        parts += [f"dp{self.dp}", f"ep{self.ep}", f"zero{self.zero}", f"mb{self.microbatch}", self.recompute]
        return " ".join(parts)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the fullest GPU (the pipeline stage that needs most)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float  # output-layer logits and loss buffers, one microbatch on the last stage
    stage: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
        }


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per stage; the first num_layers % pp stages take one more."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def layer_activation_elements(
    cfg: ModelConfig, layer_id: int, seq_len: int, recompute: Recompute, tp: int, ep: int
) -> float:
    """Stored activation elements per token for one block on one GPU (sequence parallel: /tp).

    Attention: norm input, norm output (QKV input), Q, K, V, attention output (o-proj input),
    plus the H·s probabilities when the core is not recomputed. Dense SwiGLU: norm input and
    output, gate and up outputs, their product (down-proj input): 2D + 3F. MoE: norm input and
    output, fp32 router logits and probabilities (2·2E in 2-byte units), and per chosen expert a
    dispatched copy of the token, 3·I inside the expert and its output: K·(2D + 3I); shared
    experts add 3·I_shared.
    """
    d, hd, moe = cfg.dim, cfg.head_dim, cfg.moe
    kv_heads_per_gpu = max(cfg.num_kv_heads / tp, 1)  # fewer KV heads than tp: each GPU keeps one
    if recompute == "full":
        return d / tp  # the block's input only
    attention = (2 * d + cfg.num_heads * hd * 2) / tp + 2 * kv_heads_per_gpu * hd
    if recompute == "none":
        attention += cfg.num_heads * seq_len / tp
    if cfg.is_moe_layer(layer_id):
        routed = moe.top_k * (2 * d + 3 * moe.expert_hidden_dim)
        if ep > 1:
            routed *= MOE_IMBALANCE
        if moe.capacity_factor is not None:
            routed *= moe.capacity_factor
        shared = 3 * moe.num_shared_experts * moe.shared_expert_hidden_dim
        ffn = (2 * d + 4 * moe.num_experts + routed + shared) / tp
    else:
        ffn = (2 * d + 3 * moe.dense_hidden_dim) / tp
    return attention + ffn


@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage holds, before tp/ep sharding."""

    num_dense_layers: int  # blocks with a dense FFN
    num_moe_layers: int
    non_expert_params: float  # attention, norms, routers, shared experts, dense FFNs, embeddings
    expert_params: float  # routed experts
    biggest_layer_params: float
    forward_flops_per_token: float  # blocks + head (accounting), at the plan's sequence length
    first: bool
    last: bool


def stage_shapes(cfg: ModelConfig, pp: int, seq_len: int) -> list[StageShape]:
    """Per-stage parameters and FLOPs, all from model/accounting.py."""
    whole = param_counts(cfg)
    moe_counts = layer_param_counts(cfg, cfg.num_layers - 1) if cfg.num_moe_layers else None
    dense_counts = layer_param_counts(cfg, 0) if cfg.moe.num_dense_layers else None
    flops = {
        kind: layer_forward_flops_per_token(cfg, layer_id, seq_len)
        for kind, layer_id in (("moe", cfg.num_layers - 1), ("dense", 0))
    }
    shapes = []
    for stage, layers in enumerate(stage_layers(cfg.num_layers, pp)):
        first, last = stage == 0, stage == pp - 1
        n_moe = sum(1 for i in layers if cfg.is_moe_layer(i))
        n_dense = len(layers) - n_moe
        non_expert = expert = 0.0
        biggest = 0.0
        for n, counts in ((n_moe, moe_counts), (n_dense, dense_counts)):
            if n and counts is not None:
                expert += n * counts.routed_experts
                non_expert += n * (counts.total - counts.routed_experts)
                biggest = max(biggest, counts.total)
        forward = n_moe * flops["moe"] + n_dense * flops["dense"]
        if first:
            non_expert += whole.embedding
        if last:
            # a tied head still needs its own copy when it sits on another stage than the embedding
            non_expert += cfg.dim + (whole.output or (whole.embedding if not first else 0))
            forward += head_forward_flops_per_token(cfg)
        shapes.append(StageShape(n_dense, n_moe, non_expert, expert, biggest, forward, first, last))
    return shapes


def memory_per_gpu(
    cfg: ModelConfig,
    layout: Layout,
    seq_len: int,
    num_microbatches: int,
    precision: Precision,
    stages: list[StageShape] | None = None,
) -> MemoryBreakdown:
    """Peak bytes on the fullest GPU for `layout` with 1F1B pipelining (interleaved when
    virtual_stages > 1: the first stage holds (1 + (p-1)/(p·v)) times more, Korthikanti §4.2.3).
    `stages` (from stage_shapes) may be passed in to save recomputing it in a search."""
    tp, pp, dp, ep = layout.tp, layout.pp, layout.dp, layout.ep
    stages = stages or stage_shapes(cfg, pp, seq_len)
    expert_dp = max(dp // ep, 1)
    tokens = layout.microbatch * seq_len
    element = precision.activation_bytes
    per_layer = {
        kind: {
            mode: layer_activation_elements(cfg, layer_id, seq_len, mode, tp, ep)
            for mode in (layout.recompute, "selective")
        }
        for kind, layer_id in (("moe", cfg.num_layers - 1), ("dense", 0))
    }
    best: MemoryBreakdown | None = None
    for stage, shape in enumerate(stages):
        if stage and shape == stages[stage - 1]:
            continue  # same weights as the stage before, fewer microbatches in flight
        dense, expert = shape.non_expert_params / tp, shape.expert_params / (tp * ep)

        def sharded(num_params: float, group: int, from_stage: int) -> float:
            return num_params / group if layout.zero >= from_stage else num_params

        groups = ((dense, dp), (expert, expert_dp))
        weights = sum(sharded(p, g, 3) for p, g in groups)
        grads = sum(sharded(p, g, 2) for p, g in groups)
        optim = sum(sharded(p, g, 1) for p, g in groups)
        if layout.zero >= 3:  # FSDP gathers a layer (and prefetches the next) at full size
            weights += 2 * shape.biggest_layer_params / tp

        extra = (pp - 1) / layout.virtual_stages if layout.virtual_stages > 1 else 0.0
        in_flight = min(num_microbatches, pp - stage + extra)
        counts = (("moe", shape.num_moe_layers), ("dense", shape.num_dense_layers))
        per_token = sum(n * per_layer[kind][layout.recompute] for kind, n in counts)
        activations = in_flight * tokens * per_token * element
        if layout.recompute == "full":
            # backward rebuilds one layer at a time with everything stored
            rebuilt = max((per_layer[kind]["selective"] for kind, n in counts if n), default=0.0)
            activations += tokens * rebuilt * element
        activations += tokens * cfg.dim / tp * element  # the stage's input
        # logits in the compute dtype, an fp32 copy and fp32 log-probabilities
        logits = tokens * cfg.vocab_size / tp * (element + 8) if shape.last else 0.0
        candidate = MemoryBreakdown(
            weights=weights * precision.weight_bytes,
            gradients=grads * precision.grad_bytes,
            optimizer=optim * precision.optimizer_bytes,
            activations=activations,
            logits=logits,
            stage=stage,
        )
        if best is None or candidate.total > best.total:
            best = candidate
    assert best is not None
    return best


def num_microbatches(batch_sequences: int, layout: Layout) -> int:
    """Microbatches each data-parallel replica runs per step (the batch is rounded up)."""
    per_replica = math.ceil(batch_sequences / layout.dp)
    return max(1, math.ceil(per_replica / layout.microbatch))
