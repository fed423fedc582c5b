"""`moetron finetune`: supervised fine-tuning (full, or LoRA on a frozen base) and DPO, one process.

    data.py      JSONL → token ids with a loss mask (answers only), or preference pairs
    packing.py   rows of seq_len, examples packed and kept apart (document masking)
    lora.py      the adapter; peft_format.py writes it as peft does

The base model is served-style frozen where it is not trained: it runs in eval mode (no router
balance losses, no selection-bias updates, no capacity drops); LoRA dropout still applies. The
loss is the mean cross-entropy over the step's trained tokens. DPO is trl's sigmoid loss with the
frozen base as reference (with LoRA: the same model with its adapter switched off, no second copy).
Checkpoints (moetron/train/checkpoint.py: atomic, no pickles) hold the trained tensors, AdamW's
state, the RNG and the row sampler's position, so a resumed run continues bit for bit. Outputs in
out_dir: metrics.jsonl, loss plots, adapter/ (PEFT format) or final/ (an HF model directory), and
with `merge`, merged/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ConfigError, FinetuneConfig
from moetron.convert.hf import from_pretrained, save_pretrained
from moetron.data.errors import DataError
from moetron.data.tokenizer import load_tokenizer
from moetron.finetune.data import Example, PreferencePair, load_dataset
from moetron.finetune.lora import LoRAGroupedExperts, LoRALinear, apply_lora, lora_parameters, merge_lora
from moetron.finetune.packing import (
    IGNORE,
    Batch,
    DocumentCausalAttention,
    RowSampler,
    make_batch,
    pack_examples,
)
from moetron.finetune.peft_format import save_adapter
from moetron.model.transformer import Transformer
from moetron.train import checkpoint, metrics
from moetron.train.checkpoint import TrainingState
from moetron.train.optim import clip_and_step, lr_at, set_lr


@dataclass
class FinetuneResult:
    out_dir: Path
    output_dir: Path | None  # adapter/ or final/ (None when stopped early)
    step: int
    eval_loss: float | None


def token_logprobs(model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log p(target) [B, T] (0 where not trained) and the trained mask [B, T]."""
    logits = model(batch.inputs_BT, batch.positions_BT, DocumentCausalAttention(batch.documents_BT))
    mask = batch.targets_BT != IGNORE
    logprobs = -F.cross_entropy(
        logits.transpose(1, 2), batch.targets_BT.masked_fill(~mask, 0), reduction="none"
    )
    return logprobs * mask, mask


def sft_loss(model: Transformer, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's trained tokens."""
    logprobs, mask = token_logprobs(model, batch)
    return -logprobs.sum() / mask.sum().clamp(min=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """trl's sigmoid DPO loss over sequence log-probabilities [B]; its reward metrics."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return loss, {
        "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "reward_chosen": float(chosen_rewards.mean()),
        "reward_rejected": float(rejected_rewards.mean()),
    }


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model: every LoRA update scaled by 0 for the duration (DPO's reference)."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear | LoRAGroupedExperts)]
    scalings = [m.lora_scaling for m in modules]
    for m in modules:
        m.lora_scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(modules, scalings, strict=True):
            m.lora_scaling = s


class _Trained(nn.Module):
    """The trained tensors as one module, so a LoRA checkpoint holds the adapter, not the base."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.tensors = nn.ParameterDict({name.replace(".", "__"): p for name, p in params.items()})


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    num_eval = int(len(items) * fraction)
    train = [items[i] for i in order[: len(items) - num_eval]]
    return train, [items[i] for i in order[len(items) - num_eval :]]


def _pair_examples(pairs: list[PreferencePair]) -> list[Example]:
    """Chosen sequences, then rejected ones: rows 0..n-1 and n..2n-1 of a batch."""

    def example(prompt: list[int], answer: list[int]) -> Example:
        return Example(prompt + answer, [False] * len(prompt) + [True] * len(answer))

    return [example(p.prompt, p.chosen) for p in pairs] + [example(p.prompt, p.rejected) for p in pairs]


def finetune(cfg: FinetuneConfig, stop_after: int | None = None, log=print) -> FinetuneResult:
    """Run `cfg`; `stop_after` ends the run at that step (with a checkpoint), as a killed job would,
    and a later call with the same out_dir continues it."""
    if not cfg.base or not cfg.data:
        raise ConfigError("finetune needs a base model directory and --data FILE.jsonl")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.base)
    model = from_pretrained(cfg.base, dtype=getattr(torch, cfg.base_dtype))
    dataset = load_dataset(cfg.data, tokenizer, cfg.train_on_prompt)
    dpo = cfg.method == "dpo"
    items = dataset.pairs if dpo else dataset.examples
    if not items:
        raise DataError(
            f"{cfg.data}: no {'preference pairs' if dpo else 'examples with an assistant answer'}"
        )
    log(
        f"[finetune] {cfg.data}: {len(dataset.examples)} examples, {len(dataset.pairs)} preference pairs, "
        f"{dataset.num_skipped} conversations without an assistant turn skipped"
    )
    train_items, eval_items = _split(items, cfg.eval_fraction, cfg.seed)
    use_lora = cfg.method == "lora" or (dpo and cfg.dpo_lora)
    if use_lora:
        # The adapter in float32 beside the base (whatever its dtype): what AdamW updates and saves.
        names = apply_lora(model, cfg.lora, seed=cfg.seed, device=str(next(model.parameters()).device))
        trained = dict(lora_parameters(model))
        log(
            f"[finetune] LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha} on {len(names)} modules ({', '.join(cfg.lora.targets)})"
        )
    else:
        trained = dict(model.named_parameters())
    reference = None
    if dpo and not use_lora:
        reference = from_pretrained(cfg.base, dtype=torch.float32).eval().requires_grad_(False)
    model.eval()  # the base as it serves; LoRA dropout below still trains
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    num_trained = sum(p.numel() for p in trained.values())
    log(
        f"[finetune] {cfg.method}: {num_trained:,} trained parameters of {sum(p.numel() for p in model.parameters()):,}"
    )

    pack = cfg.pack and not dpo  # DPO rows pair up: one sequence each
    train_examples = _pair_examples(train_items) if dpo else train_items
    rows, num_cut = pack_examples(train_examples, cfg.seq_len, pack, tokenizer.pad_id)
    eval_rows, _ = pack_examples(
        _pair_examples(eval_items) if dpo else eval_items, cfg.seq_len, pack, tokenizer.pad_id
    )
    if num_cut:
        log(f"[finetune] {num_cut} examples longer than seq_len={cfg.seq_len} were cut")
    num_units = len(train_items) if dpo else len(rows)  # what a step samples: pairs, or rows
    sampler = RowSampler(num_units, cfg.seed)

    params = list(trained.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    module = _Trained(trained) if use_lora else model
    checkpoint_dir = out_dir / "checkpoints"
    start = 0
    state = checkpoint.load_latest(checkpoint_dir, module, optimizer)
    if state is not None:
        start = state.step
        sampler.load_state_dict(state.loader)
        log(f"[finetune] resumed from step {start}")
    else:
        torch.manual_seed(cfg.seed)
    log_file = metrics.MetricsLog(out_dir / "metrics.jsonl", start if state is not None else None)
    last = min(cfg.steps, stop_after or cfg.steps)
    eval_loss = None
    progress = metrics.Progress(start, cfg.steps, cfg.progress, label="finetune")

    def step_loss(indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
        if not dpo:
            batch = make_batch([rows[i] for i in indices])
            return sft_loss(model, batch), {}, batch.num_trained
        half = len(train_items)
        batch = make_batch([rows[i] for i in indices] + [rows[half + i] for i in indices])
        return (*_dpo_step(model, reference, batch, len(indices), cfg.dpo_beta), batch.num_trained)

    for step in range(start + 1, last + 1):
        began = time.perf_counter()
        set_lr(optimizer, lr_at(step, cfg))  # type: ignore[arg-type]  (FinetuneConfig has lr_at's fields)
        loss, extra, num_tokens = step_loss(sampler.take(cfg.batch_size))
        loss.backward()
        grad_norm = clip_and_step(optimizer, params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        record = {
            "step": step, ("dpo_loss" if dpo else "lm_loss"): float(loss.detach()), "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            "tokens_per_s": cfg.batch_size * cfg.seq_len * (2 if dpo else 1) / elapsed,
            "trained_tokens_per_s": num_tokens / elapsed, "step_time_s": elapsed, **extra,
        }  # fmt: skip
        if eval_rows and (step % cfg.eval_every == 0 or step == cfg.steps):
            eval_loss = _evaluate(model, reference, eval_rows, cfg, dpo)
            record["val_loss"] = eval_loss
        log_file.write(record)
        progress.update(step, record)
        if step % cfg.checkpoint_every == 0 or step == last:
            saved = TrainingState(step, sampler.state_dict(), dataclasses.asdict(cfg), {})
            checkpoint.save_checkpoint(checkpoint_dir, step, module, optimizer, saved, cfg.keep_checkpoints)
    progress.close()
    if last < cfg.steps:
        return FinetuneResult(out_dir, None, last, eval_loss)
    metrics.plot_run(log_file.read(), out_dir)
    output = _write_outputs(model, cfg, use_lora, tokenizer, out_dir)
    (out_dir / "finetune.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return FinetuneResult(out_dir, output, last, eval_loss)


def _dpo_step(
    model: Transformer, reference: Transformer | None, batch: Batch, num_pairs: int, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    logprobs, _ = token_logprobs(model, batch)
    sequence = logprobs.sum(1)
    with torch.no_grad():
        if reference is None:
            with adapters_off(model):
                reference_sequence = token_logprobs(model, batch)[0].sum(1)
        else:
            reference_sequence = token_logprobs(reference, batch)[0].sum(1)
    return dpo_loss(
        sequence[:num_pairs],
        sequence[num_pairs:],
        reference_sequence[:num_pairs],
        reference_sequence[num_pairs:],
        beta,
    )


@torch.no_grad()
def _evaluate(
    model: Transformer, reference: Transformer | None, rows: list, cfg: FinetuneConfig, dpo: bool
) -> float:
    """SFT: mean cross-entropy over the held-out trained tokens; DPO: the mean held-out DPO loss."""
    if dpo:
        half = len(rows) // 2
        batch = make_batch(rows)
        loss, _ = _dpo_step(model, reference, batch, half, cfg.dpo_beta)
        return float(loss)
    total = count = 0.0
    for first in range(0, len(rows), cfg.batch_size):
        logprobs, mask = token_logprobs(model, make_batch(rows[first : first + cfg.batch_size]))
        total -= float(logprobs.sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


def _write_outputs(model: Transformer, cfg: FinetuneConfig, use_lora: bool, tokenizer, out_dir: Path) -> Path:
    if not use_lora:
        final = out_dir / "final"
        save_pretrained(model, final)
        tokenizer.save(final)
        return final
    adapter = save_adapter(model, cfg.lora, out_dir / "adapter", base_model=str(Path(cfg.base).resolve()))
    if cfg.merge:
        merge_lora(model)
        save_pretrained(model, out_dir / "merged")
        tokenizer.save(out_dir / "merged")
    return adapter
