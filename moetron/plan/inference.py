"""Inference plan: memory for weights and KV cache, GPUs needed, decode throughput and cost.

Serving layout: tensor parallelism inside a node, pipeline stages across nodes (how GPT-4 is
described to be served: 8-way TP × 16-way PP on 128 A100s). With fewer KV heads than tp each GPU
keeps a copy of its heads' cache (MQA under 8-way TP stores the cache 8 times).

Decode is pipelined: `concurrency` sequences are split into pp microbatches that circulate, so
every stage is always busy and one round (each sequence gains a token) takes pp stage-ticks. A
tick reads the stage's weights (for MoE only the experts its tokens chose: E·(1-(1-K/E)^b)) and
the KV cache of its b sequences, and does their FLOPs; it lasts the longer of the two, plus a
latency per TP all-reduce and per stage hand-off. Every sequence is assumed to hold `context`
tokens (the worst case). Prefill is not modelled: costs are per generated token.

`engine_layout` is the other view: how moetron's own engine would serve the model on those devices
(`moetron serve --data-parallel-size N --enable-expert-parallel`: attention data-parallel, each rank
its own requests and KV, experts sharded N ways; no TP or PP inside a rank), what each rank holds,
and the bytes one decode step streams (what benchmarks/serve_distributed.py checks on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetron.config import ModelConfig
from moetron.model.accounting import (
    attention_flops_per_token,
    forward_flops_per_token,
    kv_bytes_per_token,
    param_counts,
)
from moetron.plan.hardware import Accelerator

HOURS_PER_MONTH = 730.0  # 8,760 / 12
HBM_EFFICIENCY = 0.8  # share of datasheet HBM bandwidth that decode kernels stream at
COLLECTIVE_LATENCY_S = 10e-6  # one small NCCL all-reduce on NVLink / one stage hand-off
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


class InferencePlanError(ValueError):
    """The requested serving setup cannot work (with the reason and what would)."""


@dataclass(frozen=True)
class InferencePlan:
    num_gpus: int
    tp: int
    pp: int
    weight_dtype: str
    context: int
    concurrency: int
    weights_bytes: float  # whole model
    kv_bytes_per_token: int  # accounting, bf16 cache, all layers, one copy
    kv_copies: int  # how many GPUs hold the same KV head (tp / num_kv_heads, at least 1)
    kv_bytes_per_sequence: float  # at `context`, all copies
    memory_per_gpu_bytes: float
    max_concurrency: int  # sequences of `context` tokens that fit
    tokens_per_s_memory_bound: float
    tokens_per_s_compute_bound: float
    tokens_per_s: float
    usd_per_hour: float | None
    monthly_cost_usd: float | None
    cost_per_million_tokens_usd: float | None


def serving_layout(cfg: ModelConfig, device: Accelerator, num_gpus: int) -> tuple[int, int]:
    """(tp, pp): the widest tensor parallelism a node allows that divides the head count."""
    node = min(device.scale_up_size, 8, num_gpus)
    tp = max(t for t in range(1, node + 1) if cfg.num_heads % t == 0 and num_gpus % t == 0)
    pp = num_gpus // tp
    if pp > cfg.num_layers:
        raise InferencePlanError(
            f"{num_gpus} GPUs would need {pp} pipeline stages but the model has {cfg.num_layers} layers"
        )
    return tp, pp


def _kv_copies(cfg: ModelConfig, tp: int) -> int:
    return max(1, tp // cfg.num_kv_heads)


def max_concurrency(
    cfg: ModelConfig, device: Accelerator, num_gpus: int, context: int, weight_dtype: str
) -> int:
    tp, _ = serving_layout(cfg, device, num_gpus)
    weights = param_counts(cfg).total * WEIGHT_BYTES[weight_dtype]
    free = num_gpus * device.usable_memory_bytes - weights
    per_sequence = context * kv_bytes_per_token(cfg) * _kv_copies(cfg, tp)
    return max(0, int(free // per_sequence))


def gpus_needed(
    cfg: ModelConfig, device: Accelerator, concurrency: int, context: int, weight_dtype: str
) -> int:
    """Fewest GPUs (1, 2, 4, then whole nodes) that hold the weights and the KV cache."""
    node = min(device.scale_up_size, 8)
    candidates = [n for n in (1, 2, 4) if n < node] + [node * k for k in range(1, 4097)]
    for n in candidates:
        try:
            if max_concurrency(cfg, device, n, context, weight_dtype) >= concurrency:
                return n
        except InferencePlanError:
            break
    raise InferencePlanError(
        f"{concurrency} sequences of {context:,} tokens do not fit on any cluster of up to "
        f"{cfg.num_layers} pipeline stages of {device.name}"
    )


def plan_inference(
    cfg: ModelConfig,
    device: Accelerator,
    context: int,
    num_gpus: int | None = None,
    concurrency: int | None = None,
    weight_dtype: str = "bf16",
) -> InferencePlan:
    if weight_dtype not in WEIGHT_BYTES:
        raise InferencePlanError(f"weight dtype {weight_dtype!r}: choose one of {', '.join(WEIGHT_BYTES)}")
    if context > cfg.max_seq_len:
        raise InferencePlanError(f"context {context:,} exceeds the model's max_seq_len {cfg.max_seq_len:,}")
    if num_gpus is None:
        num_gpus = gpus_needed(cfg, device, concurrency or 64, context, weight_dtype)
    tp, pp = serving_layout(cfg, device, num_gpus)
    fits = max_concurrency(cfg, device, num_gpus, context, weight_dtype)
    if concurrency is None:
        concurrency = fits
    if concurrency < 1 or fits < concurrency:
        wanted = max(concurrency, 1)
        need = gpus_needed(cfg, device, wanted, context, weight_dtype)
        weights = param_counts(cfg).total * WEIGHT_BYTES[weight_dtype]
        if weights > num_gpus * device.usable_memory_bytes:
            have = f"the {weights / 1e9:,.1f} GB of {weight_dtype} weights do not fit on {num_gpus} × {device.name}"
        else:
            have = f"{num_gpus} × {device.name} hold the weights and {fits} sequence(s) of {context:,} tokens"
        raise InferencePlanError(f"{have}, not {wanted}; {need} GPUs would")

    counts = param_counts(cfg)
    w_bytes = WEIGHT_BYTES[weight_dtype]
    copies = _kv_copies(cfg, tp)
    kv_token = kv_bytes_per_token(cfg)
    per_sequence = context * kv_token * copies

    # One tick: one stage, one microbatch of b sequences, per GPU of the stage's TP group.
    b = concurrency / pp
    moe = cfg.moe
    touched = moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** b) if cfg.num_moe_layers else 0
    expert_params = counts.routed_experts * touched / moe.num_experts if cfg.num_moe_layers else 0
    weights_read = (counts.total - counts.routed_experts + expert_params) * w_bytes / (pp * tp)
    kv_read = b * per_sequence / (pp * tp)
    t_memory = (weights_read + kv_read) / (device.hbm_bytes_per_s * HBM_EFFICIENCY)
    decode_flops = (
        forward_flops_per_token(cfg, context)
        - attention_flops_per_token(cfg, context)
        + attention_flops_per_token(cfg, context, causal=False)
    )
    t_compute = b * decode_flops / (pp * tp) / (device.peak_bf16_flops * device.matmul_efficiency)
    t_latency = (2 * cfg.num_layers / pp * (tp > 1) + (pp > 1)) * COLLECTIVE_LATENCY_S
    round_s = pp * (max(t_memory, t_compute) + t_latency)
    tokens_per_s = concurrency / round_s

    price = device.price
    usd_per_hour = num_gpus * price.usd_per_gpu_hour if price else None
    return InferencePlan(
        num_gpus=num_gpus,
        tp=tp,
        pp=pp,
        weight_dtype=weight_dtype,
        context=context,
        concurrency=concurrency,
        weights_bytes=counts.total * w_bytes,
        kv_bytes_per_token=kv_token,
        kv_copies=copies,
        kv_bytes_per_sequence=per_sequence,
        memory_per_gpu_bytes=(counts.total * w_bytes + concurrency * per_sequence) / num_gpus,
        max_concurrency=fits,
        tokens_per_s_memory_bound=concurrency / (pp * (t_memory + t_latency)),
        tokens_per_s_compute_bound=concurrency / (pp * (t_compute + t_latency)),
        tokens_per_s=tokens_per_s,
        usd_per_hour=usd_per_hour,
        monthly_cost_usd=usd_per_hour * HOURS_PER_MONTH if usd_per_hour is not None else None,
        cost_per_million_tokens_usd=(
            usd_per_hour / (tokens_per_s * 3600) * 1e6 if usd_per_hour and tokens_per_s else None
        ),
    )


def weights_by_dtype(cfg: ModelConfig) -> dict[str, float]:
    total = param_counts(cfg).total
    return {dtype: total * size for dtype, size in WEIGHT_BYTES.items()}


def kv_cache_bytes(cfg: ModelConfig, context: int) -> float:
    """One sequence's KV cache (bf16, one copy) at `context` tokens."""
    return context * kv_bytes_per_token(cfg)


@dataclass(frozen=True)
class EngineLayout:
    """`moetron serve` on `ranks` devices: data-parallel attention, experts sharded over the ranks."""

    ranks: int  # serving ranks (the engine's expert-parallel size is its data-parallel size)
    expert_parallel: bool
    nodes: int
    flags: str  # the `moetron serve` flags, node 0's
    weights_per_rank_bytes: float  # replicated attention/router/embeddings/head + its experts
    kv_per_rank_bytes: float  # its share of the sequences, each of `context` tokens, one KV copy
    fits: bool  # within one device's usable memory
    note: str  # what the engine cannot do here, if anything

    @property
    def memory_per_rank_bytes(self) -> float:
        return self.weights_per_rank_bytes + self.kv_per_rank_bytes


def engine_layout(
    cfg: ModelConfig,
    device: Accelerator,
    num_gpus: int,
    context: int,
    concurrency: int,
    weight_dtype: str = "bf16",
    kv_bytes_per_value: int = 2,
) -> EngineLayout:
    counts, w_bytes = param_counts(cfg), WEIGHT_BYTES[weight_dtype]
    moe = cfg.moe if cfg.num_moe_layers else None
    notes = []
    if moe is None:
        ranks, expert_parallel = num_gpus, False
    else:
        # The engine shards experts over all its ranks: their count must divide the experts.
        ranks = max(w for w in range(1, min(num_gpus, moe.num_experts) + 1) if moe.num_experts % w == 0)
        expert_parallel = ranks > 1
        if ranks < num_gpus:
            notes.append(
                f"uses {ranks} of {num_gpus} devices: the engine's expert-parallel size is its data-parallel "
                f"size, a divisor of the {moe.num_experts} experts"
            )
    per_node = max(1, min(device.scale_up_size, 8))
    nodes = -(-ranks // per_node)
    routed = counts.routed_experts if moe is not None else 0
    weights = (counts.total - routed + routed / ranks) * w_bytes
    kv = -(-concurrency // ranks) * context * kv_bytes_per_token(cfg, kv_bytes_per_value)
    fits = weights + kv <= device.usable_memory_bytes
    if not fits:
        notes.append(
            f"a rank needs {(weights + kv) / 1e9:,.1f} GB, over one {device.name}'s "
            f"{device.usable_memory_bytes / 1e9:,.1f} GB: it would need its experts or layers split further "
            "(tensor-parallel experts, pipeline stages), which the engine does not have (its tensor "
            "parallelism splits attention heads only)"
        )
    flags = f"--data-parallel-size {ranks}" + (" --enable-expert-parallel" if expert_parallel else "")
    if nodes > 1:
        flags += f" --nnodes {nodes} --node-rank 0 --master-addr NODE0 --master-port 29500"
    return EngineLayout(ranks, expert_parallel, nodes, flags, weights, kv, fits, "; ".join(notes))


def engine_step_bytes(
    cfg: ModelConfig, ranks: int, concurrency: int, context: int, weight_bytes: float, kv_bytes_per_value: int
) -> float:
    """Bytes one decode step of `engine_layout`'s ranks streams in all, each sequence at `context`:
    every rank its replicated weights, each touched expert once (the step routes all ranks' tokens:
    E·(1-(1-K/E)^concurrency) experts touched per layer), every sequence's KV. On one CPU node the
    ranks share its memory bandwidth, so step time ≈ these bytes / that bandwidth."""
    counts = param_counts(cfg)
    routed = counts.routed_experts if cfg.num_moe_layers else 0
    touched_share = 0.0
    if routed:
        moe = cfg.moe
        touched_share = 1 - (1 - moe.top_k / moe.num_experts) ** concurrency
    replicated = (counts.total - routed) * weight_bytes * ranks
    return (
        replicated
        + routed * touched_share * weight_bytes
        + concurrency * context * kv_bytes_per_token(cfg, kv_bytes_per_value)
    )
