"""The training compute dtype: `train.dtype = "auto"` picks bf16 autocast (fp32 master weights) where
bf16 matmuls are native and fast, fp32 elsewhere; an explicit dtype always wins.

Native bf16: CUDA sm80+, and CPUs with AMX or AVX512-BF16 (moetron/hardware.py) whose bf16 matmul
also *measures* at least BF16_MIN_SPEEDUP x fp32's here: the instructions alone do not make it fast
(4.5x fp32 on an AVX512-BF16 EPYC, 0.4-0.6x on an AVX512-BF16 Xeon without AMX). Elsewhere bf16
gains nothing: model/ops.py computes it in fp32 with roundings, or the hardware has no bf16 units.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moetron import hardware

# bf16 must beat fp32's measured matmul peak by this much to pay for its coarser rounding.
BF16_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # matmul compute dtype under autocast; parameters and optimizer state stay fp32
    reason: str  # for the first log line and metrics.jsonl

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)


def resolve(requested: str, device_type: str) -> Precision:
    """`train.dtype` ("auto" | "float32" | "bfloat16") on this machine's `device_type`."""
    hw = hardware.detect()
    native = hw.native_bf16_matmul(device_type)
    where = "this GPU" if device_type == "cuda" else f"this CPU ({hw.cpu.isa})"
    if requested == "float32":
        return Precision(torch.float32, "train.dtype=float32")
    if requested == "bfloat16":
        if not native:
            _warn_slow_bf16(device_type, where)
        elif device_type == "cpu" and (speedup := hardware.bf16_matmul_speedup()) < 1.0:
            _warn_slow_bf16(device_type, where, f"its bf16 matmul measured {speedup:.2f}x fp32's here")
        return Precision(torch.bfloat16, "train.dtype=bfloat16")
    if not native:
        return Precision(
            torch.float32, f"auto: {where} has no native bf16 matmul (no AMX, AVX512-BF16 or sm80+)"
        )
    if device_type == "cuda":
        return Precision(torch.bfloat16, f"auto: {where} has native bf16 matmul")
    speedup = hardware.bf16_matmul_speedup(device_type)
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision(
            torch.bfloat16, f"auto: {where} has native bf16 matmul, measured {speedup:.1f}x fp32's"
        )
    return Precision(
        torch.float32,
        f"auto: {where} has bf16 instructions, but its bf16 matmul measured only {speedup:.2f}x fp32's here",
    )


def agree(
    chosen: Precision, sum_over_world: Callable[[list[float]], list[float]], world_size: int
) -> Precision:
    """Every rank must compute in the same dtype; "auto" measures per rank, so ranks on machines
    near the threshold could differ: then all take fp32."""
    if world_size == 1:
        return chosen
    votes = sum_over_world([1.0 if chosen.dtype == torch.bfloat16 else 0.0])[0]
    if 0 < votes < world_size:
        return Precision(torch.float32, f"{chosen.reason} on {votes:.0f} of {world_size} ranks: fp32 on all")
    return chosen


@functools.cache
def _warn_slow_bf16(device_type: str, where: str, measured: str | None = None) -> None:
    """Once per process: bf16 on hardware where it is not faster is correct, and measured here."""
    if measured is None:
        slowdown = _bf16_step_slowdown() if device_type == "cpu" else None
        measured = "without native bf16 matmul" + (
            f": a bf16 matmul under autocast took {slowdown:.2f}x fp32's time here" if slowdown else ""
        )
    warnings.warn(
        f"train.dtype=bfloat16 on {where} {measured}; train.dtype=auto (or float32) is as fast or "
        "faster and more accurate",
        stacklevel=3,
    )


def _bf16_step_slowdown(size: int = 512, repeats: int = 3) -> float:
    """Time of a size³ matmul as training computes it under bf16 autocast / in fp32 (model/ops.py)."""
    from moetron.model.ops import linear

    a, b = torch.randn(size, size), torch.randn(size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = hardware.best_seconds(lambda: linear(a, b), repeats)
    return bf16 / hardware.best_seconds(lambda: linear(a, b), repeats)
