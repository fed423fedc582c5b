"""Which checkpoint format a run writes and reads, and the full model for the HF export.

A single process (`moetron train`) writes the safetensors checkpoints of checkpoint.py; a torchrun
job writes `torch.distributed.checkpoint` ones (dcp_checkpoint.py), sharded by rank. Both live
side by side as <out_dir>/checkpoints/step_N/ and every layout reads both, so a run can resume
under another layout: the newest checkpoint decides the format (an unreadable one falls back to
older ones, as each format's loader does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moetron.config import Config
from moetron.model.transformer import Transformer
from moetron.train import checkpoint
from moetron.train.checkpoint import TrainingState
from moetron.train.distributed import DistContext
from moetron.train.optim import build_optimizer


def save(
    directory: Path,
    step: int,
    parts: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
    ctx: DistContext,
) -> None:
    if ctx.distributed:
        from moetron.train import dcp_checkpoint

        dcp_checkpoint.save_dcp(directory, step, parts, optimizer, state, keep=keep)
    else:
        checkpoint.save_checkpoint(directory, step, parts[0], optimizer, state, keep=keep)


def _is_dcp(path: Path) -> bool:
    return (path / ".metadata").is_file()


def load_latest(
    directory: Path,
    cfg: Config,
    parts: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
) -> TrainingState | None:
    """Restore from the newest checkpoint in `directory` (either format); None if there is none."""
    found = checkpoint.list_checkpoints(directory)
    if not found:
        return None
    # imported here: torch.distributed.checkpoint costs seconds, which most single runs never need
    from moetron.train import dcp_checkpoint

    with _own_kernel_choice(optimizer):
        if _is_dcp(found[-1]):
            return dcp_checkpoint.load_latest_dcp(directory, parts, optimizer)
        if not ctx.distributed:
            return checkpoint.load_latest(directory, parts[0], optimizer)
        # A single-process checkpoint into a sharded layout: load it into a full model and optimizer
        # on every rank, then let each rank keep its shards (set_state_dict with full state dicts).
        for path in reversed(found):
            if _is_dcp(path):
                return dcp_checkpoint.load_latest_dcp(directory, parts, optimizer)
            full_model = Transformer.from_config(cfg.model)
            full_optimizer = build_optimizer(full_model, cfg.train)
            try:
                state = checkpoint.load_checkpoint(path, full_model, full_optimizer)  # sets the RNG too
            except ValueError as e:
                ctx.log(f"[checkpoint] skipping {path.name}: {e}")
                continue
            _load_full(full_model, full_optimizer, parts, optimizer, directory, ctx)
            return state
    return None


@contextmanager
def _own_kernel_choice(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The optimizer keeps its kernel choice (fused or foreach AdamW: build_optimizer's, for this
    layout) through a load, not the saved job's, which its param groups carry: a one-process run
    resumed from an FSDP job's checkpoint had stepped with the foreach AdamW."""
    kernels = [
        {key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups
    ]
    try:
        yield
    finally:
        for group, chosen in zip(optimizer.param_groups, kernels, strict=True):
            group.update(chosen)


def _load_full(
    full_model: nn.Module,
    full_optimizer: torch.optim.Optimizer,
    parts: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    directory: Path,
    ctx: DistContext,
) -> None:
    """Reshard a full model + optimizer (every rank holds the same) into this layout: rank 0
    writes them as a one-file DCP checkpoint, which every rank then loads like any other (DCP
    cuts out each rank's shards, whatever the placements)."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from moetron.train import dcp_checkpoint

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    converted = directory / ".converted-from-single-process"
    if ctx.is_main:
        shutil.rmtree(converted, ignore_errors=True)
        model_sd, optim_sd = get_state_dict(full_model, full_optimizer, options=options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=converted, no_dist=True)
    ctx.barrier()
    dcp_checkpoint.load_into(dcp_checkpoint.state_dict_view(parts), optimizer, converted)
    ctx.barrier()
    if ctx.is_main:
        shutil.rmtree(converted, ignore_errors=True)


def gather_full_model(cfg: Config, parts: list[nn.Module]) -> Transformer | None:
    """The unsharded model on rank 0 (None elsewhere); every rank must call this."""
    from moetron.train import dcp_checkpoint

    state_dict = dcp_checkpoint.export_full_state_dict(parts)
    if not state_dict:
        return None
    model = Transformer.from_config(cfg.model)
    model.load_state_dict(state_dict)
    return model
