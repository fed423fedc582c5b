"""Pipeline parallelism: cut a Transformer into stages by layer and run them with a
`torch.distributed.pipelining` schedule (GPipe, 1F1B, interleaved 1F1B).

A stage is the model itself with the parts it does not own removed (torchtitan's approach): the
first stage keeps `tok_embeddings`, the last keeps `norm` and `output`, every stage keeps its own
blocks under their original names (`layers.<i>.…`), so state-dict names match the single-process
model and distributed checkpoints / HF export map 1:1 across layouts.

Loss and gradient scaling, per optimizer step of M microbatches:
    loss = (1/M) Σ_m CE_m            (CE_m: per-token mean cross-entropy of microbatch m)
Each microbatch's loss is backpropagated already multiplied by 1/M (the schedule's own
`scale_grads` is off), and every MoE layer's `router_loss_scale` is set to the same 1/M, so the
router losses enter the gradients exactly as in single-process gradient accumulation over the
same M microbatches (see moe._AttachRouterLoss).

Legend: B batch, T tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from moetron.model.moe import expert_stats_paused
from moetron.model.transformer import Transformer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits_BTV, targets_BT) -> scalar
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layer_ids(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one. The extra layers
    go to the middle stages first, then to the first: the last stage also runs the output head
    and the loss, the heaviest non-layer work."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(
            f"cannot cut {num_layers} layers into {num_stages} pipeline stages: "
            "every stage needs at least one layer (lower parallel.pp or stages per rank)"
        )
    base, extra = divmod(num_layers, num_stages)
    preference = [*range(1, num_stages - 1), 0, num_stages - 1]
    sizes = [base] * num_stages
    for stage in preference[:extra]:
        sizes[stage] += 1
    starts = [sum(sizes[:stage]) for stage in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def split_stage(model: Transformer, stage: int, num_stages: int) -> Transformer:
    """Remove from `model` (in place) everything stage `stage` of `num_stages` does not run."""
    keep = stage_layer_ids(len(model.layers), num_stages)[stage]
    blocks = dict(model.layers.named_children())
    # A ModuleList keyed by the original indices: iteration (forward, moe_layers, per-block
    # FSDP) works unchanged and names stay `layers.<i>`; integer indexing is not meaningful here.
    layers = nn.ModuleList()
    for layer_id in keep:
        layers.add_module(str(layer_id), blocks[str(layer_id)])
    model.layers = layers
    if stage != 0:
        model.tok_embeddings = None
    if stage != num_stages - 1:
        model.norm = None
        model.output = None
    return model


@dataclass
class Pipeline:
    """The stages this rank runs and the schedule that drives them.

    model_parts: the stage modules of this rank (one, or `stages_per_rank` for interleaved
    schedules), to which the trainer applies TP/EP/FSDP and over which it builds the optimizer."""

    model_parts: list[nn.Module]
    stages: list[PipelineStage]
    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    num_microbatches: int
    group: dist.ProcessGroup
    is_first: bool
    is_last: bool
    # Factor applied to each microbatch's loss; one slot shared with the schedule's loss function.
    _loss_scale: list[float] = field(default_factory=lambda: [1.0])

    def step(
        self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, scale: float = 1.0, broadcast: bool = False
    ) -> float | None:
        """Forward and backward over the whole batch in `num_microbatches` microbatches (B must
        divide). Accumulates into .grad; the caller runs the optimizer. Returns the mean loss over
        the microbatches on the last stage (on every stage with `broadcast`), else None.

        `scale` multiplies the gradients of this call (e.g. 1/grad_accum_steps when the trainer
        accumulates several pipeline steps); the returned loss is unscaled."""
        if scale <= 0:
            raise ValueError(f"scale={scale} must be > 0")
        if inputs_BT.shape[0] % self.num_microbatches:
            raise ValueError(
                f"batch size {inputs_BT.shape[0]} is not divisible by num_microbatches={self.num_microbatches}"
            )
        self._loss_scale[0] = scale / self.num_microbatches
        for part in self.model_parts:
            for layer in part.moe_layers():
                layer.router_loss_scale = self._loss_scale[0]
        losses: list[torch.Tensor] = []
        args = (inputs_BT,) if self.is_first else ()
        target = targets_BT if self.is_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        loss = (
            sum(float(x.detach()) for x in losses) / self._loss_scale[0] / self.num_microbatches
            if losses
            else None
        )
        return self._maybe_broadcast(loss) if broadcast else loss

    @torch.no_grad()
    def evaluate(
        self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, broadcast: bool = False
    ) -> float | None:
        """Mean loss over the microbatches, forward only (set the parts to eval() first)."""
        self._loss_scale[0] = 1.0 / self.num_microbatches
        losses: list[torch.Tensor] = []
        args = (inputs_BT,) if self.is_first else ()
        self.schedule.eval(*args, target=targets_BT if self.is_last else None, losses=losses)
        loss = sum(float(x.detach()) for x in losses) if losses else None
        return self._maybe_broadcast(loss) if broadcast else loss

    def _maybe_broadcast(self, loss: float | None) -> float:
        # The last stage is the last rank of the pp group for every schedule we build.
        value = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64)
        if self.stages[0].device.type != "cpu":
            value = value.to(self.stages[0].device)
        dist.broadcast(value, group=self.group, group_src=dist.get_world_size(self.group) - 1)
        return float(value)


class _Stage(PipelineStage):
    """A PipelineStage whose one-off shape-inference forward (run on empty tensors at the first
    step) is not counted in the MoE layers' expert statistics. `_forward_metadata_inference` is
    private torch API (2.13); where it is named otherwise, only step 1's expert counts suffer."""

    def _forward_metadata_inference(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with expert_stats_paused(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)


def build_pipeline(
    model: Transformer,
    pp_mesh: DeviceMesh,
    schedule: str,
    num_microbatches: int,
    loss_fn: LossFn,
    stages_per_rank: int = 1,
) -> Pipeline:
    """Cut `model` into pp_mesh.size() * stages_per_rank stages and build the schedule.

    Rank r of the pp axis runs stages r, r + pp, r + 2*pp, ... (the loop layout interleaved
    schedules expect). `model` may live on the meta device (then `to_empty` + `init_weights` each
    part afterwards) or be materialised (each rank keeps only its stages' weights, identical to
    the single-process model's: what the equivalence tests use). It is consumed: use
    `.model_parts` afterwards."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
    interleaved = schedule == "interleaved_1f1b"
    if interleaved and stages_per_rank < 2:
        raise ValueError("schedule 'interleaved_1f1b' needs stages_per_rank >= 2")
    if not interleaved and stages_per_rank != 1:
        raise ValueError(
            f"schedule {schedule!r} runs one stage per rank; got stages_per_rank={stages_per_rank}"
        )
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp_size * stages_per_rank
    if model.cfg.tie_embeddings and num_stages > 1:
        raise ValueError(
            "tie_embeddings=true cannot be pipelined: the embedding and the output head would live "
            "on different stages"
        )
    stage_layer_ids(model.cfg.num_layers, num_stages)  # clear error before any work
    if num_microbatches < pp_size:
        raise ValueError(
            f"num_microbatches={num_microbatches} must be >= parallel.pp={pp_size}, "
            "or some stages would idle for the whole step"
        )

    device = _device(pp_mesh.device_type)
    group = pp_mesh.get_group()
    stage_ids = [pp_rank + k * pp_size for k in range(stages_per_rank)]
    parts: list[nn.Module] = []
    stages: list[PipelineStage] = []
    for k, stage_id in enumerate(stage_ids):
        # The last part reuses `model` itself: no copy of a materialised model's weights.
        source = model if k == len(stage_ids) - 1 else copy.deepcopy(model)
        part = split_stage(source, stage_id, num_stages)
        parts.append(part)
        stages.append(_Stage(part, stage_id, num_stages, device, group=group))

    loss_scale = [1.0]

    def scaled_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits_BTV, targets_BT) * loss_scale[0]

    # scale_grads=False: the 1/M factor is applied to each microbatch's loss instead (above), the
    # same factor the MoE layers apply to their router losses.
    if interleaved:
        runner = SCHEDULES[schedule](stages, num_microbatches, loss_fn=scaled_loss, scale_grads=False)
    else:
        runner = SCHEDULES[schedule](stages[0], num_microbatches, loss_fn=scaled_loss, scale_grads=False)
    return Pipeline(
        model_parts=parts,
        stages=stages,
        schedule=runner,
        num_microbatches=num_microbatches,
        group=group,
        is_first=0 in stage_ids,
        is_last=num_stages - 1 in stage_ids,
        _loss_scale=loss_scale,
    )


def _device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)
