"""The serving engine's kernels, installed into a model from outside by swapping module classes.

As expert parallelism swaps the experts' class (moetron/parallel/expert_parallel.py), the engine's
runner swaps the classes of the model's modules for subclasses whose `forward` calls the serving
kernels of batch_invariant.py: the model's code stays single-device training code that reads no
global, and the swapped modules keep their parameters, names and isinstance checks.

    Linear          → InvariantLinear / FastLinear (per batch mode)
    RMSNorm         → KernelRMSNorm (moetron's row kernel where it takes the operands)
    FeedForward     → InvariantFeedForward (invariant mode: SiLU rounded from float64)
    GroupedExperts  → the per-expert loop with the mode's matmul and SiLU
    MoELayer        → KernelMoELayer (the whole routed-expert layer in one kernel call)

`install(model, kernels)` first restores every swapped module to its model class, so one model
can move between engines of either mode (tests do), and the fused path (fused_layers.py) installs
on top of this. A model whose installed kernels are not a runner's own is re-installed by that
runner before its forward (ModelRunner.run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moetron.infer.batch_invariant import (
    fast_linear,
    fused_routed_experts,
    invariant_linear,
    invariant_silu,
    kernel_rms_norm,
)
from moetron.model.moe import FeedForward, GroupedExperts, MoELayer, grouped_swiglu
from moetron.model.ops import Linear
from moetron.model.transformer import RMSNorm

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ServingModule:
    """Mixin of every swapped-in class: `model_class` is the class `install` restores first."""

    model_class: ClassVar[type[nn.Module]]


class InvariantLinear(ServingModule, Linear):
    model_class = Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight)


class FastLinear(ServingModule, Linear):
    model_class = Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight)


class KernelRMSNorm(ServingModule, RMSNorm):
    model_class = RMSNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernel_rms_norm(x, self.weight, self.eps)
        return super().forward(x) if out is None else out


class InvariantFeedForward(ServingModule, FeedForward):
    model_class = FeedForward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(invariant_silu(self.w1(x)) * self.w3(x))


class InvariantGroupedExperts(ServingModule, GroupedExperts):
    """The per-expert loop where the fused routed-expert kernel declines (kernels off)."""

    model_class = GroupedExperts

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(
            x_ND, num_tokens_per_expert_E, self.w1, self.w2, self.w3, invariant_linear, invariant_silu
        )


class FastGroupedExperts(ServingModule, GroupedExperts):
    model_class = GroupedExperts

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_ND, num_tokens_per_expert_E, self.w1, self.w2, self.w3, fast_linear, F.silu)


class KernelMoELayer(ServingModule, MoELayer):
    model_class = MoELayer

    def routed_experts(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        experts = self.experts
        out_TD = None
        if not self.training:
            out_TD = fused_routed_experts(x_TD, weights_TK, expert_ids_TK, experts)
        if out_TD is None:  # the kernel declined (kernels off, another dtype): dispatch, loop, combine
            return super().routed_experts(x_TD, weights_TK, expert_ids_TK)
        if self.record_stats:
            self.tokens_per_expert += torch.bincount(expert_ids_TK.flatten(), minlength=self.cfg.num_experts)
        return out_TD


@dataclass(frozen=True)
class ServingKernels:
    """Which class each model class becomes; `prepare` runs on each module swapped (fused path)."""

    name: str
    classes: dict[type[nn.Module], type[nn.Module]]
    prepare: Callable[[nn.Module, nn.Module], None] | None = field(default=None, compare=False)


INVARIANT = ServingKernels(
    "invariant",
    {
        Linear: InvariantLinear,
        RMSNorm: KernelRMSNorm,
        FeedForward: InvariantFeedForward,
        GroupedExperts: InvariantGroupedExperts,
        MoELayer: KernelMoELayer,
    },
)
# Moetron's routed-expert and RMSNorm kernels are invariant, and faster than PyTorch's dispatch at
# every batch size measured, so the fast mode uses them too.
FAST = ServingKernels(
    "fast",
    {
        Linear: FastLinear,
        RMSNorm: KernelRMSNorm,
        GroupedExperts: FastGroupedExperts,
        MoELayer: KernelMoELayer,
    },
)


def restore(model: nn.Module) -> None:
    """Every swapped module back to its model class (training numerics)."""
    for module in model.modules():
        if isinstance(module, ServingModule):
            module.__class__ = module.model_class
    model.__dict__.pop("_serving_kernels", None)


def install(model: nn.Module, kernels: ServingKernels) -> None:
    """Swap `model`'s modules to `kernels`' classes (after restoring any earlier installation)."""
    restore(model)
    for module in model.modules():
        new_class = kernels.classes.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
            if kernels.prepare is not None:
                kernels.prepare(model, module)
    model.__dict__["_serving_kernels"] = kernels  # plain attribute: not a submodule, not state


def installed(model: nn.Module) -> ServingKernels | None:
    """The ServingKernels `install` last put into `model`, or None."""
    return model.__dict__.get("_serving_kernels")
