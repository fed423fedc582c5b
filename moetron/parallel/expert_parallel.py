"""Expert parallelism: each rank of the "ep" mesh axis holds E/ep experts of every MoE layer, and
the tokens routed to an expert travel to its rank and back with two variable-size all-to-alls.

Legend: N (token, expert) rows routed on this rank, sorted by global expert id; R rows received
from all ep ranks; D model width; E experts; L = E/P local experts; P ep ranks.

`MoELayer.forward` is unchanged: it routes, sorts its rows by expert and calls
`experts(x_ND, num_tokens_per_expert_E)` (torchtitan's ExpertParallel hook point). After
`apply_ep`, that call does, for this rank:
  1. all-to-all of the per-expert counts (L per peer): how many rows each peer sends to each of
     our experts; the row split sizes follow from it (one host sync);
  2. all-to-all of the rows with those variable split sizes (autograd-aware: backward sends the
     gradients back along the same routes);
  3. regroup the received rows from (source rank, local expert) to (local expert, source rank)
     order, so that each local expert's rows are contiguous;
  4. run the local experts on the local shards of w1/w2/w3 (`grouped_swiglu`);
  5. undo 3 and all-to-all the outputs back: the result lines up with x_ND row for row.
Routing, weighting, the router losses and `tokens_per_expert` stay in `MoELayer` and see only this
rank's tokens (statistics are per rank).

Parameters: w1/w2/w3 become DTensors `Shard(0)` on the ep mesh (local shape [E/P, ...]), so
`torch.distributed.checkpoint` sees global shapes and can reshard to any other layout.

FSDP on top (see `fully_shard_experts`): the experts must be wrapped in their own `fully_shard`
*before* their block is, over the data-parallel axes *not* in ep (mesh.py's
("dp_replicate", "dp_shard_mod_ep")), so that the block-level FSDP leaves them alone; and their
gradient divide factor must be the full data-parallel degree, because the all-to-all backward
already sums the gradients of the tokens of all ep ranks (torchtitan does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from moetron.model.moe import GroupedExperts, grouped_swiglu


@dataclass(frozen=True)
class Routes:
    """Where this rank's rows went in `dispatch_tokens`, so `combine_tokens` can bring them back."""

    sent_splits: list[int]  # rows sent to each ep rank (length P)
    received_splits: list[int]  # rows received from each ep rank (length P)
    regroup_R: torch.Tensor | None  # received-order index of each expert-ordered row; None: identity
    num_tokens_per_local_expert_L: torch.Tensor


def dispatch_tokens(
    x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor, group: ProcessGroup, ep_degree: int
) -> tuple[torch.Tensor, Routes]:
    """Send each row to the ep rank holding its expert. Returns the rows this rank's experts must
    process, contiguous per local expert (x_RD), and the routes to send their outputs back."""
    num_local_experts = num_tokens_per_expert_E.shape[0] // ep_degree
    with torch.no_grad():
        # num_received_PL[p, l]: rows ep rank p sends to our local expert l.
        num_received_PL = all_to_all_single(num_tokens_per_expert_E, None, None, group)
        num_received_PL = torch.ops._c10d_functional.wait_tensor(num_received_PL)
        num_received_PL = num_received_PL.view(ep_degree, num_local_experts)
        sent_splits = num_tokens_per_expert_E.view(ep_degree, num_local_experts).sum(dim=1).tolist()
        received_splits = num_received_PL.sum(dim=1).tolist()  # the host sync

    x_RD = all_to_all_single_autograd(x_ND.contiguous(), received_splits, sent_splits, group)

    regroup_R = None
    if num_local_experts > 1:  # with one local expert, the received order is already by expert
        with torch.no_grad():
            segment_R = torch.repeat_interleave(
                torch.arange(num_received_PL.numel(), device=x_ND.device), num_received_PL.flatten()
            )
            source_R, local_expert_R = segment_R // num_local_experts, segment_R % num_local_experts
            regroup_R = (local_expert_R * ep_degree + source_R).argsort(stable=True)
        x_RD = x_RD[regroup_R]
    routes = Routes(sent_splits, received_splits, regroup_R, num_received_PL.sum(dim=0))
    return x_RD, routes


def combine_tokens(y_RD: torch.Tensor, routes: Routes, group: ProcessGroup) -> torch.Tensor:
    """Inverse of `dispatch_tokens`: expert outputs back to the ranks (and rows) they came from."""
    if routes.regroup_R is not None:
        y_RD = y_RD[routes.regroup_R.argsort()]
    return all_to_all_single_autograd(y_RD, routes.sent_splits, routes.received_splits, group)


def _local(weight: torch.Tensor) -> torch.Tensor:
    # Token counts differ per rank, so the expert matmuls cannot be DTensor ops: run them on the
    # local shard. to_local's backward hands the gradient back as a Shard(0) DTensor.
    return weight.to_local() if isinstance(weight, DTensor) else weight


class ExpertParallelGroupedExperts(GroupedExperts):
    """`GroupedExperts` whose weights hold only this rank's experts; forward dispatches the rows to
    the experts' ranks and combines the outputs. Created by `ExpertParallel`, never directly."""

    ep_mesh: DeviceMesh

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        group, ep_degree = self.ep_mesh.get_group(), self.ep_mesh.size()
        x_RD, routes = dispatch_tokens(x_ND, num_tokens_per_expert_E, group, ep_degree)
        weights = [_local(w) for w in (self.w1, self.w2, self.w3)]
        if x_RD.shape[0] > 0:
            y_RD = grouped_swiglu(x_RD, routes.num_tokens_per_local_expert_L, *weights)
        else:
            # No rows for any local expert. grouped_swiglu's empty result would hang off nothing:
            # this rank's backward would skip the dispatch all-to-all its peers wait in (deadlock),
            # and leave the expert gradients None instead of zero. Keep both in the graph.
            y_RD = x_RD * 0.0 + sum(w.sum() for w in weights) * 0.0
        return combine_tokens(y_RD, routes, group)


class ExpertParallel(ParallelStyle):
    """`parallelize_module` style for `GroupedExperts` on a 1-D ep mesh: shards w1/w2/w3 on the
    expert dimension (`Shard(0)`) and makes the module dispatch/combine its tokens (see above).

    The module's class is swapped for `ExpertParallelGroupedExperts` (as `fully_shard` does for
    its own hooks): parameter names, and so state-dict keys, stay the same.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if type(module) is not GroupedExperts:
            raise TypeError(
                f"ExpertParallel applies to a plain GroupedExperts, got {type(module).__name__}: "
                "apply it once, before FSDP; tensor-parallel experts (tp > 1) cannot also be ep-sharded"
            )
        if device_mesh.ndim != 1:
            raise ValueError(f"the ep mesh must be 1-D, got dims {device_mesh.mesh_dim_names}")
        ep_degree = device_mesh.size()
        if module.num_experts % ep_degree:
            raise ValueError(f"num_experts={module.num_experts} is not divisible by ep={ep_degree}")
        if any(isinstance(p, DTensor) for p in module.parameters()):
            raise ValueError(
                "the experts are sharded already (tensor parallel?): expert parallelism needs them "
                "whole, and ep × tp on the same experts is not supported"
            )
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(
                param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank
            )
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.__class__ = ExpertParallelGroupedExperts
        module.ep_mesh = device_mesh
        return module


def _grouped_experts(model: nn.Module) -> list[GroupedExperts]:
    # modules(), not model.moe_layers(): pipeline stages replace or delete layers.
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard the experts of every MoE layer of `model` (a Transformer or a pipeline stage of one)
    over `ep_mesh` (1-D, e.g. `world_mesh["ep"]`), in place. A size-1 mesh leaves the model as it
    is. On a materialised model, rank 0's experts are scattered: the sharded model holds exactly
    the weights of the unsharded one. A meta-device model also works (then `to_empty` +
    `init_weights`), but on CPU DTensor's random init is not offset-aware: each rank draws its shard
    as if it were the whole tensor, so the weights differ from a single process's (and the RNG
    stream of every later parameter shifts)."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"the ep mesh must be 1-D, got dims {ep_mesh.mesh_dim_names}")
    if ep_mesh.size() == 1:
        return
    for experts in _grouped_experts(model):
        parallelize_module(experts, ep_mesh, ExpertParallel())


def fully_shard_experts(
    model: nn.Module, dp_mesh: DeviceMesh, gradient_divide_factor: int, **fsdp_kwargs: Any
) -> None:
    """FSDP for expert-parallel experts; call after `apply_ep` and before `fully_shard` on blocks.

    dp_mesh: the data-parallel axes that do not split experts (mesh.py:
      `world_mesh["dp_replicate", "dp_shard_mod_ep"]` for HSDP, `world_mesh["dp_shard_mod_ep"]`
      otherwise; size 1 is fine and still needed: it keeps the block's FSDP, whose mesh overlaps ep,
      off these parameters).
    gradient_divide_factor: the full data-parallel degree (dp_replicate * dp_shard). The
      all-to-all's backward already sums the expert gradients over the ep ranks' tokens, so FSDP
      must divide by every data-parallel rank, not only by the size of dp_mesh.
    fsdp_kwargs: passed to `fully_shard` (mp_policy, reshard_after_forward, ...).
    """
    for experts in _grouped_experts(model):
        if not isinstance(experts, ExpertParallelGroupedExperts):
            raise TypeError("fully_shard_experts is for expert-parallel experts: call apply_ep first")
        ep_degree, shard_size = experts.ep_mesh.size(), dp_mesh.size(dp_mesh.ndim - 1)
        if "shard_placement_fn" not in fsdp_kwargs and shard_size * ep_degree > experts.num_experts:
            # Dim 0 already holds only E/ep experts; shard the next one to avoid uneven padding.
            fsdp_kwargs = {**fsdp_kwargs, "shard_placement_fn": lambda param: Shard(1)}
        fully_shard(experts, mesh=dp_mesh, **fsdp_kwargs)
        experts.set_gradient_divide_factor(gradient_divide_factor)
        if dp_mesh.device_type != "cuda" and shard_size > 1:
            # A custom factor makes FSDP reduce-scatter with PREMUL_SUM, which only NCCL has ("Cannot
            # use ReduceOp.PREMUL_SUM with Gloo"): sum, then divide. Not when the reduce-scatter
            # axis (the last) has size 1: torch 2.13 then divides by the factor twice.
            experts.set_force_sum_reduction_for_comms(True)
