"""The one place that fixes the order parallelism is applied in: TP, EP, activation
checkpointing, FSDP. Each step transforms a plain model (or pipeline stage) from outside."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from moetron.config import TrainConfig
from moetron.model.moe import expert_stats_paused
from moetron.model.transformer import Transformer
from moetron.parallel.mesh import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, train: TrainConfig) -> None:
    """Apply every enabled parallelism to `model` (a Transformer or one pipeline stage), in place.

    TP first (it replaces weights by DTensors that FSDP then shards further), EP next (experts
    split on "ep"; FSDP must see them already split), activation checkpointing around each block
    (inside FSDP's per-block hooks), FSDP last, over the data-parallel axes."""
    # imported here: torch.distributed.tensor/fsdp cost seconds, which a single process never needs
    from moetron.parallel.fsdp import apply_fsdp, mixed_precision_policy
    from moetron.parallel.tensor_parallel import apply_tp

    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if dims.ep > 1:
        from moetron.parallel.expert_parallel import apply_ep

        apply_ep(model, mesh["ep"])
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dims.fsdp_enabled:
        hsdp = dims.dp_replicate > 1
        apply_fsdp(
            model,
            mesh["dp_replicate", "dp_shard"] if hsdp else mesh["dp_shard"],
            mp_policy=mixed_precision_policy(train.dtype),
            expert_dp_mesh=(
                (mesh["dp_replicate", "dp_shard_mod_ep"] if hsdp else mesh["dp_shard_mod_ep"])
                if dims.ep > 1
                else None
            ),
            gradient_divide_factor=dims.dp_degree,
            reshard_after_forward=dims.pp == 1,
        )


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward instead of storing its activations. Applied from outside
    the model; MoE statistics are recorded in the first forward only, not again in the recompute."""

    def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), expert_stats_paused(model)

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *args, _forward=forward: checkpoint(
            _forward, *args, use_reentrant=False, context_fn=recompute_context
        )
