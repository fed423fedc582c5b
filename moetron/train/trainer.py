"""The training loop: data → model → AdamW, with metrics, evaluation, checkpoints and HF export."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moetron.config import Config
from moetron.data import PackedLoader, PreparedData, ValLoader, prepare
from moetron.model.accounting import train_flops_per_token
from moetron.model.ops import measure_matmul_flops
from moetron.model.transformer import Transformer
from moetron.train import metrics
from moetron.train.checkpoint import TrainingState, load_latest, save_checkpoint
from moetron.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None  # None when stopped early
    last_step: int
    val_loss: float | None


def autocast(cfg: Config) -> contextlib.AbstractContextManager:
    if cfg.train.dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward instead of storing its activations. Applied from outside
    the model; MoE statistics are recorded in the first forward only, not again in the recompute."""

    def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _stats_paused(model)

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _forward=forward: checkpoint(
            _forward, *args, use_reentrant=False, context_fn=recompute_context
        )


@contextlib.contextmanager
def _stats_paused(model: Transformer) -> Iterator[None]:
    layers = list(model.moe_layers())
    for layer in layers:
        layer.record_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.record_stats = True


def lm_loss(model: Transformer, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV = model(inputs_BT)
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, batches: ValLoader) -> float:
    """Mean validation cross-entropy per token over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast(cfg):
        for inputs, targets in batches:
            total += float(lm_loss(model, inputs, targets)) * targets.numel()
            count += targets.numel()
    model.train(was_training)
    return total / count


def train(cfg: Config, stop_after: int | None = None) -> TrainResult:
    """Train per `cfg`; `stop_after` ends the run early at that step (with a checkpoint), as a
    killed job would, so a later `train.resume=true` run continues it."""
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare(cfg.data, seed=tc.seed)
    if cfg.model.vocab_size != data.vocab_size:
        cfg.model.vocab_size = data.vocab_size  # the tokenizer decides; the resolved config records it
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    torch.manual_seed(tc.seed)
    model = Transformer.from_config(cfg.model)
    model.train()
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    for layer in model.moe_layers():
        layer.router_loss_scale = 1.0 / tc.grad_accum_steps  # the LM loss is scaled the same way
    optimizer = build_optimizer(model, tc)
    loader = PackedLoader(data.train_path, tc.seq_len, tc.batch_size, seed=tc.seed, dtype=data.dtype)
    val_batches = ValLoader(data.val_path, tc.seq_len, tc.batch_size, tc.eval_batches, dtype=data.dtype)

    start_step = 0
    checkpoint_dir = out_dir / "checkpoints"
    if tc.resume:
        state = load_latest(checkpoint_dir, model, optimizer)
        if state is not None:
            start_step = state.step
            loader.load_state_dict(state.loader)
            print(f"[train] resumed from step {start_step}")
    log = metrics.MetricsLog(out_dir / "metrics.jsonl", truncate_after_step=start_step if tc.resume else None)

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps
    flops_per_step = train_flops_per_token(cfg.model, tc.seq_len) * tokens_per_step
    compute_dtype = torch.bfloat16 if tc.dtype == "bfloat16" else torch.float32
    peak_flops = measure_matmul_flops(compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    last_step = min(tc.steps, stop_after or tc.steps)
    val_loss = None
    progress = _progress(start_step, tc.steps, tc.progress)

    for step in range(start_step + 1, last_step + 1):
        started = time.perf_counter()
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        metrics.reset_expert_load(model)
        step_loss = 0.0
        for _ in range(tc.grad_accum_steps):
            inputs, targets = loader.next_batch()
            with autocast(cfg):
                loss = lm_loss(model, inputs, targets)
            (loss / tc.grad_accum_steps).backward()
            step_loss += float(loss.detach()) / tc.grad_accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started

        aux_loss, z_loss = metrics.router_losses(model)
        moe = cfg.model.moe
        record = {
            "step": step,
            "loss": step_loss + moe.aux_loss_weight * aux_loss + moe.z_loss_weight * z_loss,
            "lm_loss": step_loss,
            "aux_loss": aux_loss,
            "z_loss": z_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_step / elapsed,
            "mfu": flops_per_step / elapsed / peak_flops,
            "step_time_s": elapsed,
            "expert_load": metrics.expert_load(model),
        }
        if step % tc.eval_every == 0 or step == tc.steps:
            val_loss = evaluate(model, cfg, val_batches)
            record.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50)))
        log.write(record)
        progress.update(step, record)
        if step % tc.checkpoint_every == 0 or step == last_step:
            state = TrainingState(step=step, loader=loader.state_dict(), config=cfg.to_dict(), extra={})
            save_checkpoint(checkpoint_dir, step, model, optimizer, state, keep=tc.keep_checkpoints)
    progress.close()

    if last_step < tc.steps:
        return TrainResult(out_dir, None, last_step, val_loss)
    final_dir = export(model, data, out_dir / "final")
    metrics.plot_run(log.read(), out_dir)
    return TrainResult(out_dir, final_dir, last_step, val_loss)


def export(model: Transformer, data: PreparedData, final_dir: Path) -> Path:
    """The inference checkpoint: an HF directory with tokenizer, chat template and generation config."""
    model.save_pretrained(final_dir)
    data.tokenizer.save(final_dir)
    generation = {"bos_token_id": data.tokenizer.bos_id, "eos_token_id": data.tokenizer.eos_id}
    if data.tokenizer.pad_id is not None:
        generation["pad_token_id"] = data.tokenizer.pad_id
    (final_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return final_dir


class _progress:
    """A tqdm bar with ETA on a terminal; one line every 10% of the run otherwise (CI logs)."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        import sys

        from tqdm import tqdm

        self.total, self.enabled = total, enabled
        self.bar = (
            tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            if enabled and sys.stderr.isatty()
            else None
        )

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        summary = f"loss {record['lm_loss']:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if "val_loss" in record:
            summary += f" val {record['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(1)
        elif step % max(self.total // 10, 1) == 0 or step == self.total or "val_loss" in record:
            print(f"[train] step {step}/{self.total} {summary}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
