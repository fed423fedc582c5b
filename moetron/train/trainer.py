"""The training loop: data → model → AdamW, with metrics, evaluation, checkpoints and HF export."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moetron import hardware
from moetron.config import Config, ConfigError, TrainConfig
from moetron.convert.hf import ExpertBiasExportWarning, has_expert_bias, save_pretrained
from moetron.data import PackedLoader, PreparedData, ValLoader, prepare
from moetron.model.accounting import executed_train_flops_per_token
from moetron.model.moe import MoELayer
from moetron.model.transformer import Transformer
from moetron.parallel.parallelize import apply_activation_checkpointing, parallelize
from moetron.train import balance, cpu_training_kernels, metrics, precision, resume
from moetron.train import checkpoint_io as checkpoints
from moetron.train.allocator import retain_freed_memory
from moetron.train.checkpoint import TrainingState
from moetron.train.distributed import (
    DistContext,
    clip_grad_norm_,
    init_distributed,
    measure_comm_time,
    peak_memory_bytes,
    teardown,
)
from moetron.train.optim import build_optimizer, clip_and_step, lr_at, set_lr

if TYPE_CHECKING:
    from moetron.parallel.pipeline import Pipeline


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None  # None when stopped early
    last_step: int
    val_loss: float | None
    val_bpb: float | None = None  # bits per byte of the held-out text


def lm_loss(model: Transformer, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return model(inputs_BT, targets_BT=targets_BT)


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


@dataclass
class ValScore:
    """Summed cross-entropy (nats) over the scored tokens, and the raw text bytes those tokens stand
    for: per token it is the loss, per byte (in bits) it compares models across tokenizers."""

    total_nats: float
    num_tokens: int
    num_bytes: int

    @property
    def loss(self) -> float:
        return self.total_nats / self.num_tokens

    @property
    def bits_per_byte(self) -> float:
        return self.total_nats / (math.log(2) * self.num_bytes) if self.num_bytes else math.nan

    def metrics(self) -> dict[str, float]:
        return {
            "val_loss": self.loss,
            "val_perplexity": math.exp(min(self.loss, 50)),
            "val_bpb": self.bits_per_byte,
        }


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, batches: ValLoader, token_bytes_V: torch.Tensor) -> ValScore:
    """Validation score over a fixed set of batches (one process); token_bytes_V as in `_evaluate_parts`."""
    compute = precision.resolve(cfg.train.dtype, "cpu")
    return _evaluate_parts([model], None, compute, batches, token_bytes_V, torch.device("cpu"))


@torch.no_grad()
def _evaluate_parts(
    parts: list[nn.Module],
    pipe: Pipeline | None,
    compute: precision.Precision,
    batches: ValLoader,
    token_bytes_V: torch.Tensor,
    device: torch.device,
) -> ValScore:
    """This data-parallel rank's score on its validation batches; token_bytes_V [V] holds the text
    bytes of each token id (`Tokenizer.token_byte_lengths`)."""
    was_training = parts[0].training
    for part in parts:
        part.eval()
    total, count, num_bytes = 0.0, 0, 0
    with compute.autocast(device.type):
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            if pipe is None:
                loss = float(lm_loss(parts[0], inputs, targets))
            else:
                # every microbatch must be the same size: drop the last batch's remainder
                keep = inputs.shape[0] - inputs.shape[0] % pipe.num_microbatches
                if keep == 0:
                    continue
                inputs, targets = inputs[:keep], targets[:keep]
                loss = pipe.evaluate(inputs, targets, broadcast=True)
            total += loss * targets.numel()
            count += targets.numel()
            num_bytes += int(token_bytes_V[targets.cpu()].sum())
    for part in parts:
        part.train(was_training)
    return ValScore(total, count, num_bytes)


def train(cfg: Config, stop_after: int | None = None) -> TrainResult:
    """Train per `cfg`; `stop_after` ends the run early at that step (with a checkpoint), as a
    killed job would, so a later run in the same out_dir continues it (train.resume, resume.py).

    Under `torchrun` (WORLD_SIZE > 1) every rank calls this; cfg.parallel says how they split the
    work (moetron/parallel). Only rank 0 writes metrics, plots and the exported model."""
    ctx = init_distributed(cfg.parallel)
    try:
        return _train(cfg, ctx, stop_after)
    finally:
        teardown(ctx)


def _train(cfg: Config, ctx: DistContext, stop_after: int | None) -> TrainResult:
    tc, dims = cfg.train, ctx.dims
    compute = precision.agree(
        precision.resolve(tc.dtype, ctx.device.type), ctx.sum_over_world, ctx.dims.world_size
    )
    ctx.log(f"[train] computing in {compute.name} ({compute.reason}); {hardware.detect().describe()}")
    if ctx.device.type == "cpu":
        retain_freed_memory()  # steps reuse their freed activations instead of faulting in new pages
    out_dir = Path(tc.out_dir)
    start = resume.plan_start(cfg, ctx)  # every rank reads out_dir before rank 0 changes it
    ctx.barrier()
    if ctx.is_main:
        if start.overwrite:
            resume.clear_previous_run(out_dir)
            ctx.log(f"[train] train.overwrite: removed the previous run's outputs from {out_dir}")
        resume.mark_started(ctx)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = prepare(cfg.data, seed=tc.seed)  # rank 0 first: the others then reuse its shards
    ctx.barrier()
    if not ctx.is_main:
        data = prepare(cfg.data, seed=tc.seed)
    if cfg.model.vocab_size != data.vocab_size:
        cfg.model.vocab_size = data.vocab_size  # the tokenizer decides; the resolved config records it
    if start.saved is not None:  # may change tc.grad_accum_steps, to keep the global batch
        resume.check_resumable(cfg, start.saved, dims.dp_degree, ctx.log)
    if ctx.is_main:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # Every layout starts from the weights one process would: each rank initialises the full model
    # on the CPU with the same seed, then keeps its shards (exact, and cheap for the models trained
    # on CPUs; a large model would initialise on the meta device and per shard instead).
    torch.manual_seed(tc.seed)
    model = Transformer.from_config(cfg.model)
    model.train()
    pipe, parts = None, [model]
    if dims.pp > 1:
        from moetron.parallel.pipeline import build_pipeline

        par = cfg.parallel
        pipe = build_pipeline(
            model.to(ctx.device), ctx.mesh["pp"], par.pp_schedule, par.pp_microbatches, cross_entropy,
            stages_per_rank=par.pp_stages_per_rank,
        )  # fmt: skip
        parts = pipe.model_parts
    for part in parts:
        part.to(ctx.device)  # one GPU when the machine has one, even without torchrun
        if ctx.distributed:
            parallelize(part, dims, ctx.mesh, tc)
        elif tc.activation_checkpointing:
            apply_activation_checkpointing(part)
        for layer in part.moe_layers():
            layer.router_loss_scale = 1.0 / tc.grad_accum_steps  # the LM loss is scaled the same way
        cpu_training_kernels.install(part)
    container = nn.ModuleList(parts)
    optimizer = build_optimizer(container, tc)
    dp_rank, dp_size = ctx.dp_rank, dims.dp_degree
    loader = PackedLoader(
        data.train_path, tc.seq_len, tc.batch_size, tc.seed, dp_rank, dp_size, dtype=data.dtype
    )
    val_batches = ValLoader(
        data.val_path, tc.seq_len, tc.batch_size, tc.eval_batches, dp_rank, dp_size, dtype=data.dtype
    )
    token_bytes_V = torch.tensor(data.tokenizer.token_byte_lengths, dtype=torch.int64)

    start_step = 0
    # Training time so far (step times; the slowest rank's, so that every rank's schedule agrees)
    # and when warmup ended: a time budget's schedule and stop (train.time_budget_s).
    clock = {"train_time_s": 0.0, "warmup_end_s": 0.0}
    checkpoint_dir = out_dir / "checkpoints"
    if start.resume:
        state = checkpoints.load_latest(checkpoint_dir, cfg, parts, optimizer, ctx)
        if state is None:  # never start over silently: that would replace the run in out_dir
            raise ConfigError(
                f"no checkpoint in {checkpoint_dir} loads (reasons above); to start over there, "
                "pass --train.overwrite=true"
            )
        start_step = state.step
        clock.update({key: float(state.extra[key]) for key in clock if key in state.extra})
        loader.load_state_dict(state.loader)
        ctx.log(f"[train] resumed from step {start_step}")
        if start_step >= tc.steps:
            ctx.log(f"[train] train.steps={tc.steps}: nothing left to train (raise it to continue)")
        elif _out_of_time(tc, clock):
            ctx.log(
                f"[train] train.time_budget_s={tc.time_budget_s:g}: spent ({clock['train_time_s']:.1f} s "
                "trained); nothing left to train (raise it to continue)"
            )
    truncate_after = start_step if start.resume else None  # None: a fresh run empties the log
    log = metrics.MetricsLog(out_dir / "metrics.jsonl", truncate_after) if ctx.is_main else None

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps * dp_size
    flops_per_step = executed_train_flops_per_token(cfg.model, tc.seq_len) * tokens_per_step
    peak_flops = hardware.matmul_peak_flops(compute.dtype, ctx.device.type) * dims.world_size
    params = [p for p in container.parameters() if p.requires_grad]
    finished_before = start_step >= tc.steps or _out_of_time(tc, clock)
    last_step = start_step if finished_before else min(tc.steps, stop_after or tc.steps)
    completed, trained_to = finished_before, start_step
    val_loss = val_bpb = None
    progress = metrics.Progress(
        start_step, tc.steps, tc.progress and ctx.is_main, time_budget_s=tc.time_budget_s,
        time_spent_s=clock["train_time_s"],
    )  # fmt: skip

    # Communication time is sampled on one step (profiling slows it): the second of this attempt.
    profiled_step = min(start_step + 2, last_step) if ctx.distributed else None

    for step in range(start_step + 1, last_step + 1):
        started = time.perf_counter()
        lr = lr_at(step, tc, clock["train_time_s"], clock["warmup_end_s"])
        set_lr(optimizer, lr)
        for part in parts:
            metrics.reset_expert_load(part)
        with measure_comm_time(step == profiled_step) as comm_time_s:
            step_loss = _forward_backward(cfg, ctx, compute, model, pipe, loader)
            load_LE = _expert_load(cfg, ctx, parts)
            if cfg.model.moe.bias_update_rate > 0:
                balance.update_expert_bias(_moe_layers(cfg, parts), load_LE, cfg.model.moe.bias_update_rate)
            grad_norm = _clip_and_step(tc, ctx, optimizer, params)
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        clock["train_time_s"] += ctx.max_over_world(elapsed) if tc.time_budget_s > 0 else elapsed
        if step == tc.warmup_steps:
            clock["warmup_end_s"] = clock["train_time_s"]
        completed, trained_to = step == tc.steps or _out_of_time(tc, clock), step

        record = {"step": step, **_step_losses(cfg, ctx, pipe, parts, step_loss)}
        record.update(
            lr=lr,
            grad_norm=float(grad_norm),
            tokens_per_s=tokens_per_step / elapsed,
            mfu=flops_per_step / elapsed / peak_flops,
            step_time_s=elapsed,
            expert_load=load_LE.tolist(),
            max_load_ratio=balance.max_load_ratio(load_LE),
            max_abs_expert_bias=_max_abs_expert_bias(cfg, ctx, parts),
        )
        if step == start_step + 1:
            record.update(dtype=compute.name, dtype_reason=compute.reason, peak_flops=peak_flops)
        if ctx.distributed:
            record["peak_memory_bytes"] = [int(v) for v in ctx.per_rank(peak_memory_bytes(ctx.device))]
            if step == profiled_step:
                record["comm_time_s"] = ctx.per_rank(comm_time_s[0])
            if step == start_step + 1:
                record["layout"] = dims.describe()
        if step % tc.eval_every == 0 or completed:
            score = _evaluate_parts(parts, pipe, compute, val_batches, token_bytes_V, ctx.device)
            if not ((pipe is None or pipe.is_last) and ctx.reports_metrics):
                score = ValScore(0.0, 0, 0)  # pipelined losses are counted on the last stage, tp copies once
            score = ValScore(*ctx.sum_over_world([score.total_nats, score.num_tokens, score.num_bytes]))
            val_loss, val_bpb = score.loss, score.bits_per_byte
            record.update(score.metrics())
        if log is not None:
            log.write(record)
        progress.update(step, record, clock["train_time_s"])
        if step % tc.checkpoint_every == 0 or step == last_step or completed:
            state = TrainingState(step, loader.state_dict(), cfg.to_dict(), extra=dict(clock))
            checkpoints.save(checkpoint_dir, step, parts, optimizer, state, tc.keep_checkpoints, ctx)
        if completed:
            break
    progress.close()

    if not completed:  # stopped by stop_after
        return TrainResult(out_dir, None, trained_to, val_loss, val_bpb)
    if finished_before and log is not None:  # nothing trained: the run's last evaluation
        last_eval = next((r for r in reversed(log.read()) if "val_loss" in r), {})
        val_loss, val_bpb = last_eval.get("val_loss"), last_eval.get("val_bpb")
    final_dir = out_dir / "final"
    full_model = checkpoints.gather_full_model(cfg, parts) if ctx.distributed else model
    if ctx.is_main:
        export(full_model, data, final_dir)
        metrics.plot_run(log.read(), out_dir)
    ctx.barrier()
    return TrainResult(out_dir, final_dir, trained_to, val_loss, val_bpb)


def _out_of_time(tc: TrainConfig, clock: dict[str, float]) -> bool:
    return tc.time_budget_s > 0 and clock["train_time_s"] >= tc.time_budget_s


def _forward_backward(
    cfg: Config,
    ctx: DistContext,
    compute: precision.Precision,
    model: Transformer,
    pipe: Pipeline | None,
    loader: PackedLoader,
) -> float:
    """Forward and backward over grad_accum_steps micro-batches. Returns this rank's mean LM loss
    (0 on pipeline stages without the loss)."""
    tc = cfg.train
    step_loss = 0.0
    for _ in range(tc.grad_accum_steps):
        inputs, targets = loader.next_batch()
        inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
        with compute.autocast(ctx.device.type):
            if pipe is not None:
                loss = pipe.step(inputs, targets, scale=1.0 / tc.grad_accum_steps) or 0.0
            else:
                loss_tensor = lm_loss(model, inputs, targets)
                (loss_tensor / tc.grad_accum_steps).backward()
                loss = float(loss_tensor.detach())
        step_loss += loss / tc.grad_accum_steps
    return step_loss


def _clip_and_step(
    tc: TrainConfig, ctx: DistContext, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> torch.Tensor:
    """Clip the global grad norm to train.grad_clip (0: no limit), step; returns the norm."""
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    if not ctx.distributed:
        return clip_and_step(optimizer, params, max_norm)
    grad_norm = clip_grad_norm_(params, max_norm, ctx)
    optimizer.step()
    return grad_norm


def _step_losses(
    cfg: Config, ctx: DistContext, pipe: Pipeline | None, parts: list[nn.Module], step_loss: float
) -> dict[str, float]:
    """The step's LM loss averaged over data-parallel ranks, and the router losses of the latest
    microbatch averaged over MoE layers (and ranks)."""
    aux_sum = z_sum = 0.0
    num_layers = 0
    for part in parts:
        for layer in part.moe_layers():
            if layer.last_aux_loss is not None:
                aux_sum += float(layer.last_aux_loss)
                z_sum += float(layer.last_z_loss)
                num_layers += 1
    if ctx.distributed:
        holds_loss = pipe is None or pipe.is_last
        lm = step_loss if holds_loss and ctx.reports_metrics else 0.0
        if not ctx.reports_metrics:
            aux_sum = z_sum = num_layers = 0
        lm, aux_sum, z_sum, num_layers = ctx.sum_over_world([lm, aux_sum, z_sum, num_layers])
        step_loss = lm / ctx.dims.dp_degree
    aux = aux_sum / num_layers if num_layers else 0.0
    z = z_sum / num_layers if num_layers else 0.0
    moe = cfg.model.moe
    return {
        "loss": step_loss + moe.aux_loss_weight * aux + moe.z_loss_weight * z,
        "lm_loss": step_loss,
        "aux_loss": aux,
        "z_loss": z,
    }


def _moe_layers(cfg: Config, parts: list[nn.Module]) -> list[tuple[int, MoELayer]]:
    """This rank's MoE layers (a pipeline stage holds some), each with its row in the
    [MoE layers, experts] load matrix."""
    num_dense = cfg.model.moe.num_dense_layers
    return [
        (int(name.split(".")[1]) - num_dense, module)  # name: layers.<layer id>.ffn
        for part in parts
        for name, module in part.named_modules()
        if isinstance(module, MoELayer)
    ]


def _expert_load(cfg: Config, ctx: DistContext, parts: list[nn.Module]) -> torch.Tensor:
    """Tokens routed to each expert this step [MoE layers, experts] int64, summed over the
    data-parallel ranks: the same on every rank (the bias update relies on it)."""
    load_LE = torch.zeros(cfg.model.num_moe_layers, cfg.model.moe.num_experts, dtype=torch.float64)
    if ctx.reports_metrics:
        for row, layer in _moe_layers(cfg, parts):
            load_LE[row] += layer.tokens_per_expert.cpu().double()
    if ctx.distributed:  # counts below 2^53: the fp64 sum is exact
        load_LE = torch.tensor(ctx.sum_over_world(load_LE.flatten().tolist())).view_as(load_LE)
    return load_LE.round().long()


def _max_abs_expert_bias(cfg: Config, ctx: DistContext, parts: list[nn.Module]) -> float:
    """The largest |router bias| over every MoE layer of the model. Each layer's bias is the same
    on every rank holding it, so one rank per pipeline stage (data-parallel rank 0, tp rank 0)
    reports its layers' maxima and a sum gathers them."""
    max_L = torch.zeros(cfg.model.num_moe_layers, dtype=torch.float64)
    if ctx.dp_rank == 0 and ctx.reports_metrics:
        for row, layer in _moe_layers(cfg, parts):
            max_L[row] = balance.max_abs_bias([layer])
    if ctx.distributed:
        max_L = torch.tensor(ctx.sum_over_world(max_L.tolist()))
    return float(max_L.max()) if max_L.numel() else 0.0


def export(model: Transformer, data: PreparedData, final_dir: Path) -> Path:
    """The inference checkpoint: an HF directory with tokenizer, chat template and generation config."""
    if has_expert_bias(model):
        print(
            "[train] export: the routers' selection bias is saved as ...gate.e_score_correction_bias; "
            "moetron serves it exactly, transformers' Mixtral ignores it (docs/training.md)"
        )
    with warnings.catch_warnings():  # the line above says it; save_pretrained's warning is for API users
        warnings.simplefilter("ignore", ExpertBiasExportWarning)
        save_pretrained(model, final_dir)
    data.tokenizer.save(final_dir)
    generation = {"bos_token_id": data.tokenizer.bos_id, "eos_token_id": data.tokenizer.eos_id}
    if data.tokenizer.pad_id is not None:
        generation["pad_token_id"] = data.tokenizer.pad_id
    (final_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return final_dir
