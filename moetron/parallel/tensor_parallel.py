"""apply_tp: Megatron-style tensor parallelism as DTensor plans (no sequence parallelism).

Attention: wq/wk/wv column-wise (each rank owns num_heads / tp query heads and num_kv_heads / tp
kv heads; the model reshapes with view(B, T, -1, head_dim), so it never learns it holds fewer),
wo row-wise (one all-reduce). Dense FFN and shared experts: w1/w3 column-wise, w2 row-wise.
Routed experts: the inner dimension I is split (w1/w3 [E, I, D] on dim 1, w2 [E, D, I] on dim 2),
the matmuls run on the local shards and the partial outputs are all-reduced; the router stays
replicated, so every tp rank routes the same tokens the same way.
Embedding row-wise over the vocabulary, output head column-wise with the logits gathered, as
torchtitan does without loss parallelism; both replicated when tied (one tensor, two plans).

Why no sequence parallelism: the MoE layer's load-balancing loss and token counts are defined
over the tokens it routes. With the sequence split over tp ranks each router would see a slice,
which changes the aux loss (nonlinear in its token group) and needs an all-gather before routing
anyway; the norms it would shard are tiny. Activations between blocks are replicated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from moetron.model.moe import FeedForward, GroupedExperts, MoELayer, grouped_swiglu


class TensorParallelGroupedExperts(GroupedExperts):
    """`GroupedExperts` holding a tp shard of every expert's inner dimension. Each rank runs the
    same tokens through its slice of the SwiGLU (a local matmul per expert, the same kernel as one
    process) and the partial outputs are summed, as a row-wise linear does. Created by
    `ExpertTensorParallel`, never directly."""

    tp_mesh: DeviceMesh

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        mesh = self.tp_mesh
        # identity forward; backward all-reduces each rank's partial input gradient
        x_ND = DTensor.from_local(x_ND, mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()]
        )
        weights = [w.to_local() for w in (self.w1, self.w2, self.w3)]
        partial_ND = grouped_swiglu(x_ND, num_tokens_per_expert_E, *weights)
        return DTensor.from_local(partial_ND, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()


class ExpertTensorParallel(ParallelStyle):
    """`parallelize_module` style for `GroupedExperts`: w1/w3 [E, I, D] `Shard(1)`, w2 [E, D, I]
    `Shard(2)` on a 1-D tp mesh. Swaps the class (parameter names, so state-dict keys, stay)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if type(module) is not GroupedExperts:
            raise TypeError(
                f"ExpertTensorParallel applies to a plain GroupedExperts, got {type(module).__name__}"
            )
        for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            param = getattr(module, name)
            sharded = distribute_tensor(param.detach(), device_mesh, [Shard(dim)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.__class__ = TensorParallelGroupedExperts
        module.tp_mesh = device_mesh
        return module


def _feed_forward_plan() -> dict[str, ParallelStyle]:
    return {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over `tp_mesh` in place."""
    tied = model.cfg.tie_embeddings
    if getattr(model, "tok_embeddings", None) is not None and not tied:
        parallelize_module(
            model.tok_embeddings,
            tp_mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        )
    if getattr(model, "output", None) is not None and not tied:
        parallelize_module(model.output, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    for block in model.layers:
        parallelize_module(
            block.attention,
            tp_mesh,
            {
                "wq": ColwiseParallel(),
                "wk": ColwiseParallel(),
                "wv": ColwiseParallel(),
                "wo": RowwiseParallel(),
            },
        )
        if isinstance(block.ffn, FeedForward):
            parallelize_module(block.ffn, tp_mesh, _feed_forward_plan())
        elif isinstance(block.ffn, MoELayer):
            parallelize_module(block.ffn.experts, tp_mesh, ExpertTensorParallel())
            if block.ffn.shared_experts is not None:
                parallelize_module(block.ffn.shared_experts, tp_mesh, _feed_forward_plan())
