"""Matmul kernels chosen per device and dtype.

On CPUs without native bf16/fp16 dot products (no AVX512-BF16, no AMX: e.g. AVX2-only EPYC),
oneDNN emulates half-precision matmuls at a small fraction of fp32 speed (measured on such a
machine: F.linear 19 GFLOP/s in bf16 vs 170 in fp32). There we keep bf16 *storage* and compute the
product in fp32, rounding the result back: faster, and at least as accurate. Everywhere else
(CUDA, AMX CPUs) the native kernel runs. These are training's numerics; the serving engine installs
its own kernels from outside by swapping module classes (moetron/infer/serving_kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetron.hardware import native_bf16_matmul

_HALF = (torch.bfloat16, torch.float16)


def emulated_half_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype a matmul on `x` should emulate in fp32 on this CPU (from x's dtype or an
    active CPU autocast), or None when the native kernel is the right one."""
    if x.device.type != "cpu" or native_bf16_matmul("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in _HALF else None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, like F.linear without bias."""
    if (half := emulated_half_dtype(x)) is not None:
        # Round the operands to half precision, multiply in fp32 (bf16 products are exact in fp32,
        # the sum accumulates in fp32 as the native kernels do), round the result: same numerics
        # as a native half matmul, at fp32 speed.
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.to(half).float(), weight.to(half).float()).to(half)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear (no bias) routed through `linear`. Subclassing keeps DTensor/FSDP plans that
    match `nn.Linear` working unchanged; the serving engine swaps in subclasses with its own kernels
    (moetron/infer/serving_kernels.py)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        # torch's default init computes nothing on the meta device, yet its first call there
        # imports torch._dynamo (5+ s of a server's start-up). Models built on meta are initialised
        # by `init_weights()` or a loaded state dict.
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # as Linear.reset_parameters
            super().reset_parameters()


def grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 where the expert matmuls can be one grouped_mm: CUDA rows that are bf16, or that bf16
    autocast would compute in bf16 (fp32 master weights; grouped_mm has no autocast rule, so the
    caller casts). None elsewhere: torch 2.13's CPU grouped_mm backward fails on an expanded incoming
    gradient ("Invalid strides/sizes") and wants 16-byte-aligned strides; a loop of mm is as fast
    there. On CUDA it is one kernel launch for all experts instead of one per expert."""
    if not (x.is_cuda and hasattr(F, "grouped_mm")):
        return None
    autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    return torch.bfloat16 if x.dtype == torch.bfloat16 or autocast else None


def grouped_linear(x_ND: torch.Tensor, weight_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-group x @ weight[e].T over contiguous row groups in one kernel (CUDA, bf16).

    x_ND: rows sorted by group; weight_EOI: [E, out, in]; offsets_E: int32 end row of each group.
    """
    return F.grouped_mm(x_ND, weight_EOI.transpose(-2, -1), offs=offsets_E)
