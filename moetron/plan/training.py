"""Training estimate of one parallel layout: step time, MFU, days with failures (plan/search.py
ranks the layouts).

Step time of a layout (all per GPU, for the slowest pipeline stage):

    t_microbatch = compute + memory-bound ops + TP collectives + EP all-to-all + PP send/recv
    t_step       = (m + (p - 1) / v) · t_microbatch            1F1B, bubble (p-1)/(v·m)
                 + exposed data-parallel sync + optimizer step

* compute: the stage's FLOPs (model/accounting.py, ×3 for training, plus recomputation) at
  `matmul_efficiency` × bf16 peak; fp8 runs the weight matmuls FP8_GEMM_SPEEDUP× faster,
  attention stays bf16.
* memory-bound ops (norms, activations, softmax, residuals): each stored activation byte is
  moved 3 times (written, read back, touched once more) at HBM bandwidth.
* TP with sequence parallelism: per block 2 all-gathers + 2 reduce-scatters of the microbatch's
  activations forward, as many backward (+2+2 more when fully recomputing), over NVLink/ICI,
  not overlapped with compute.
* EP: dispatch + combine all-to-all of K copies of each token per MoE block, forward and
  backward; the share to ranks on the same node moves at NVLink speed, the rest on the NIC.
  `ep_overlap` is the share hidden behind compute (0 by default; DeepSeek's DualPipe: ~1).
* PP: activations (forward) and their gradients (backward) cross each stage boundary, v times
  with interleaving, on the NIC.
* DP: ZeRO-1/2 reduce-scatter gradients and all-gather weights once per step (ZeRO-2 reduce-
  scatters every microbatch), overlapped with one microbatch of compute; ZeRO-3 gathers
  weights twice and reduce-scatters gradients every microbatch, overlapped with that microbatch.
* Collectives reach hardware.COMM_EFFICIENCY of the per-direction link bandwidth; a ring moves
  (n-1)/n of the buffer per GPU.

Failures: per-GPU MTBF and restart time give the cluster MTBF M; checkpoints of the weights and
optimizer state take δ to write; the Young/Daly interval τ = sqrt(2·δ·M) minimises lost time and
wall = compute · (1 + δ/τ) / (1 - (τ/2 + R)/M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moetron.config import ModelConfig
from moetron.model.accounting import (
    attention_flops_per_token,
    layer_forward_flops_per_token,
    layer_param_counts,
    param_counts,
    train_flops_per_token,
)
from moetron.plan.hardware import COMM_EFFICIENCY, GB, Accelerator
from moetron.plan.memory import (
    MOE_IMBALANCE,
    Layout,
    MemoryBreakdown,
    Precision,
    StageShape,
    layer_activation_elements,
    memory_per_gpu,
    num_microbatches,
    stage_shapes,
)

HOURS_PER_DAY = 24.0
MEMORY_TRAFFIC_PER_ACTIVATION_BYTE = 3.0
# fp8 weight GEMMs (per-tile scaling, bf16 accumulation promoted on CUDA cores) run this much faster
# than bf16 ones on the same GPU: GEMM-level gains behind the 1.3-1.5x end-to-end speedups
# NVIDIA Transformer Engine / NeMo report on H100, not the 2x of the datasheet.
FP8_GEMM_SPEEDUP = 1.6
# torch.optim.AdamW(foreach=True) per parameter: weight decay (r/w p), lerp m (r m, g; w m), mul v
# (r/w v), addcmul v (r v, g; w v), sqrt v -> t, div t, add eps t (r/w t twice), addcdiv p (r p, m, t;
# w p): 20 fp32 words.
UNFUSED_ADAMW_WORDS = 20
# A layout may round the global batch up to dp · microbatches · microbatch sequences, by at most this.
MAX_BATCH_ROUNDING = 1.10


@dataclass(frozen=True)
class Reliability:
    """Failure and checkpoint assumptions. The MTBF comes from the Llama 3 paper (419 unexpected
    interruptions in 54 days on 16,384 H100s: ~50,000 h per GPU, hosts and network included).

    Checkpoints are asynchronous by default (torch.distributed.checkpoint.async_save, Megatron
    async): training pauses only while each GPU copies its shard to host memory; the write to
    storage runs behind it and bounds how often one can checkpoint. With `async_checkpoint=False`
    training waits for the storage write.
    """

    gpu_mtbf_hours: float = 50_000.0
    restart_minutes: float = 10.0  # detect, reschedule, reload the checkpoint
    async_checkpoint: bool = True
    host_copy_bytes_per_s: float = 25 * GB  # GPU -> pinned host memory over PCIe
    storage_bytes_per_s_per_gpu: float = 1 * GB
    storage_bytes_per_s_max: float = 1000 * GB  # the storage system's ceiling


@dataclass(frozen=True)
class TrainingJob:
    """The question: train `cfg` on `tokens` tokens with `num_gpus` devices of one type."""

    cfg: ModelConfig
    device: Accelerator
    num_gpus: int
    tokens: float
    seq_len: int
    batch_tokens: float
    precision: Precision
    ep_overlap: float = 0.0
    fused_optimizer: bool = True  # False: PyTorch's foreach AdamW (the CPU default), ~3x the traffic
    reliability: Reliability = field(default_factory=Reliability)
    fixed: tuple[tuple[str, object], ...] = ()  # (Layout field, value) pairs the search must keep

    def allows(self, layout: Layout) -> bool:
        return all(getattr(layout, name) == value for name, value in self.fixed)

    @property
    def batch_sequences(self) -> int:
        return max(1, round(self.batch_tokens / self.seq_len))


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, split by cause (the slowest stage, summed over microbatches)."""

    compute: float
    memory_bound: float
    tensor_parallel: float
    expert_parallel: float
    pipeline_p2p: float
    bubble: float
    data_parallel: float
    optimizer: float

    @property
    def total(self) -> float:
        return (
            self.compute + self.memory_bound + self.tensor_parallel + self.expert_parallel
            + self.pipeline_p2p + self.bubble + self.data_parallel + self.optimizer
        )  # fmt: skip


@dataclass(frozen=True)
class Failures:
    cluster_mtbf_hours: float
    checkpoint_pause_seconds: float  # training stops this long per checkpoint
    checkpoint_interval_minutes: float
    overhead: float  # wall / compute - 1


@dataclass(frozen=True)
class LayoutEstimate:
    layout: Layout
    num_microbatches: int
    memory: MemoryBreakdown
    step: StepTime
    batch_sequences: int  # after rounding to dp · m · microbatch
    steps: int
    mfu: float  # model FLOPs (with attention) / (GPUs used · peak bf16 · step time)
    hfu: float  # the same with recomputation FLOPs counted
    compute_days: float
    failures: Failures
    days: float  # wall clock with failures and checkpoints
    gpu_hours: float  # all num_gpus GPUs, idle ones included
    cost_usd: float | None
    effective_mfu: float  # mfu · compute_days / days


def _ring(bytes_per_gpu: float, group: int, bandwidth: float) -> float:
    """Seconds for a ring all-gather or reduce-scatter of a buffer of `bytes_per_gpu`."""
    if group <= 1:
        return 0.0
    return (group - 1) / group * bytes_per_gpu / (bandwidth * COMM_EFFICIENCY)


def failures(job: TrainingJob, gpus: int) -> Failures:
    rel = job.reliability
    mtbf_s = rel.gpu_mtbf_hours * 3600 / gpus
    counts = param_counts(job.cfg)
    checkpoint_bytes = counts.total * (job.precision.weight_bytes + job.precision.optimizer_bytes)
    write = checkpoint_bytes / min(gpus * rel.storage_bytes_per_s_per_gpu, rel.storage_bytes_per_s_max)
    pause = checkpoint_bytes / gpus / rel.host_copy_bytes_per_s if rel.async_checkpoint else write
    tau = max(math.sqrt(2 * pause * mtbf_s), write)  # Young/Daly, but no faster than storage
    lost = (tau / 2 + rel.restart_minutes * 60) / mtbf_s
    overhead = math.inf if lost >= 1 else (1 + pause / tau) / (1 - lost) - 1
    return Failures(mtbf_s / 3600, pause, tau / 60, overhead)


def step_time(job: TrainingJob, layout: Layout, stages: list[StageShape], m: int) -> StepTime:
    cfg, dev, prec = job.cfg, job.device, job.precision
    tp, pp, dp, ep, v = layout.tp, layout.pp, layout.dp, layout.ep, layout.virtual_stages
    tokens = layout.microbatch * job.seq_len
    act = prec.activation_bytes
    peak = dev.peak_bf16_flops * dev.matmul_efficiency
    weight_peak = peak * FP8_GEMM_SPEEDUP if prec.matmul_fp8 and dev.peak_fp8_flops else peak
    attention_share = attention_flops_per_token(cfg, job.seq_len) / cfg.num_layers
    train_per_forward = train_flops_per_token(cfg, job.seq_len) / sum(
        s.forward_flops_per_token for s in stages
    )
    scale_up = dev.scale_up_bytes_per_s
    tp_bw = scale_up if tp <= dev.scale_up_size else dev.network_bytes_per_s

    # forward FLOPs per token of one MoE block's routed experts: its weight FLOPs times their
    # share of its active weights
    routed_share = 0.0
    if cfg.num_moe_layers:
        last = cfg.num_layers - 1
        counts = layer_param_counts(cfg, last)
        routed_share = (layer_forward_flops_per_token(cfg, last, job.seq_len) - attention_share) * (
            counts.active_routed_experts / counts.active
        )
    stored_per_layer = {  # activation elements per token written in a block, nothing recomputed
        kind: layer_activation_elements(cfg, layer_id, job.seq_len, "none", tp, ep)
        for kind, layer_id in (("moe", cfg.num_layers - 1), ("dense", 0))
    }
    slowest = None
    for index, shape in enumerate(stages):
        if index and shape == stages[index - 1]:
            continue
        layers = shape.num_dense_layers + shape.num_moe_layers
        attention = layers * attention_share
        weights = shape.forward_flops_per_token - attention
        moe_weights = 0.0
        if shape.num_moe_layers and ep > 1:  # the busiest EP rank sets the pace
            moe_weights = shape.num_moe_layers * routed_share * (MOE_IMBALANCE - 1)
        recompute = {"none": 0.0, "selective": attention, "full": shape.forward_flops_per_token}
        seconds_per_token = train_per_forward * ((weights + moe_weights) / weight_peak + attention / peak)
        compute = tokens / tp * (seconds_per_token + recompute[layout.recompute] / peak)
        stored = (
            shape.num_moe_layers * stored_per_layer["moe"]
            + shape.num_dense_layers * stored_per_layer["dense"]
        )
        memory_bound = MEMORY_TRAFFIC_PER_ACTIVATION_BYTE * tokens * stored * act / dev.hbm_bytes_per_s
        # TP: 2 all-gathers + 2 reduce-scatters per block per pass, activations [tokens, dim]
        passes = 3 if layout.recompute == "full" else 2
        tensor = layers * 4 * passes * _ring(tokens * cfg.dim * act, tp, tp_bw) * (tp > 1)
        expert = 0.0
        if shape.num_moe_layers and ep > 1:
            sent = tokens / tp * cfg.moe.top_k * cfg.dim * act * MOE_IMBALANCE
            on_node = min(ep, max(dev.scale_up_size // tp, 1))
            t_on = sent * (on_node - 1) / ep / (scale_up * COMM_EFFICIENCY)
            t_off = sent * (ep - on_node) / ep / (dev.network_bytes_per_s * COMM_EFFICIENCY)
            # dispatch + combine, forward + backward (+ forward again when recomputing fully)
            expert = shape.num_moe_layers * 2 * passes * max(t_on, t_off) * (1 - job.ep_overlap)
        p2p = 0.0
        if pp > 1:
            p2p_bw = scale_up if layout.world <= dev.scale_up_size else dev.network_bytes_per_s
            p2p = 2 * v * tokens * cfg.dim / tp * act / (p2p_bw * COMM_EFFICIENCY)
        per_microbatch = (compute, memory_bound, tensor, expert, p2p)
        if slowest is None or sum(per_microbatch) > sum(slowest[1]):
            slowest = (shape, per_microbatch)
    assert slowest is not None
    shape, (compute, memory_bound, tensor, expert, p2p) = slowest
    t_micro = sum(slowest[1])
    bubble = (pp - 1) / v * t_micro

    # Data parallelism: weights and gradients of this GPU's shard, in 2-byte words.
    dense = shape.non_expert_params / tp
    experts = shape.expert_params / (tp * ep)
    expert_dp = dp // ep
    word = prec.weight_bytes

    def sync(params: float, group: int) -> float:
        """Hierarchical all-gather (or reduce-scatter): first among the group's members inside a
        scale-up domain, then across domains on the NIC with 1/inside of the buffer."""
        inside = max(1, min(group, dev.scale_up_size // tp))
        outside = math.ceil(group / inside)
        buffer = params * word
        return _ring(buffer, inside, scale_up) + _ring(buffer / inside, outside, dev.network_bytes_per_s)

    gather = sync(dense, dp) + sync(experts, expert_dp)  # one all-gather of the weights
    if layout.zero >= 3:
        per_micro = 3 * gather  # gather forward, gather backward, reduce-scatter gradients
        data_parallel = m * max(0.0, per_micro - compute)
    else:
        reduce_scatters = m if layout.zero == 2 else 1
        data_parallel = max(0.0, (1 + reduce_scatters) * gather - t_micro)
    local_optimizer_params = dense / (dp if layout.zero >= 1 else 1) + experts / (
        expert_dp if layout.zero >= 1 else 1
    )
    if job.fused_optimizer:  # one pass: read + write master, m and v, read the gradient, write the weight
        traffic = 2 * prec.optimizer_bytes + prec.grad_bytes + word
    else:  # torch.optim.AdamW(foreach): 8 list ops move ~20 fp32 words per parameter
        traffic = UNFUSED_ADAMW_WORDS * 4
    optimizer = local_optimizer_params * traffic / dev.hbm_bytes_per_s
    return StepTime(
        compute=m * compute,
        memory_bound=m * memory_bound,
        tensor_parallel=m * tensor,
        expert_parallel=m * expert,
        pipeline_p2p=m * p2p,
        bubble=bubble,
        data_parallel=data_parallel,
        optimizer=optimizer,
    )


def estimate(
    job: TrainingJob,
    layout: Layout,
    stages: list[StageShape] | None = None,
    memory: MemoryBreakdown | None = None,
) -> LayoutEstimate:
    """Memory, step time, MFU and wall-clock days of one layout (fits or not: check memory)."""
    cfg = job.cfg
    stages = stages or stage_shapes(cfg, layout.pp, job.seq_len)
    m = num_microbatches(job.batch_sequences, layout)
    memory = memory or memory_per_gpu(cfg, layout, job.seq_len, m, job.precision, stages)
    step = step_time(job, layout, stages, m)
    batch_sequences = layout.dp * m * layout.microbatch
    batch_tokens = batch_sequences * job.seq_len
    steps = max(1, math.ceil(job.tokens / batch_tokens))
    model_flops = batch_tokens * train_flops_per_token(cfg, job.seq_len)
    recompute_flops = {
        "none": 0.0,
        "selective": attention_flops_per_token(cfg, job.seq_len),
        "full": sum(s.forward_flops_per_token for s in stages),
    }[layout.recompute] * batch_tokens
    peak = layout.world * job.device.peak_bf16_flops * step.total
    compute_days = steps * step.total / 3600 / HOURS_PER_DAY
    fail = failures(job, layout.world)
    days = compute_days * (1 + fail.overhead)
    gpu_hours = days * HOURS_PER_DAY * job.num_gpus
    price = job.device.price
    mfu = model_flops / peak
    return LayoutEstimate(
        layout=layout,
        num_microbatches=m,
        memory=memory,
        step=step,
        batch_sequences=batch_sequences,
        steps=steps,
        mfu=mfu,
        hfu=(model_flops + recompute_flops) / peak,
        compute_days=compute_days,
        failures=fail,
        days=days,
        gpu_hours=gpu_hours,
        cost_usd=gpu_hours * price.usd_per_gpu_hour if price else None,
        effective_mfu=mfu * compute_days / days * layout.world / job.num_gpus if days else 0.0,
    )
