"""The training compute dtype: `train.dtype = "auto"` picks bf16 autocast (fp32 master weights) where
bf16 matmuls are native and fast, fp32 elsewhere; an explicit dtype always wins.

Native bf16: AMX or AVX512-BF16 CPUs (oneDNN's bf16 matmul ~4.5x fp32's measured on an AVX512-BF16
EPYC) and CUDA sm80+ (moetron/hardware.py decides). Elsewhere bf16 gains nothing: model/ops.py
computes it in fp32 with roundings (an AVX2 CPU) or the hardware has no bf16 units.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass

import torch

from moetron import hardware


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
        return Precision(torch.bfloat16, "train.dtype=bfloat16")
    if native:
        return Precision(torch.bfloat16, f"auto: {where} has native bf16 matmul")
    return Precision(torch.float32, f"auto: {where} has no native bf16 matmul (no AMX, AVX512-BF16 or sm80+)")


@functools.cache
def _warn_slow_bf16(device_type: str, where: str) -> None:
    """Once per process: bf16 on hardware without bf16 units is correct, and measured here."""
    slowdown = _bf16_step_slowdown() if device_type == "cpu" else None
    measured = f": a bf16 matmul under autocast took {slowdown:.2f}x fp32's here" if slowdown else ""
    warnings.warn(
        f"train.dtype=bfloat16 on {where} without native bf16 matmul{measured}; "
        "train.dtype=auto (or float32) is as fast or faster and more accurate",
        stacklevel=3,
    )


def _bf16_step_slowdown(size: int = 512, repeats: int = 3) -> float:
    """Time of a size³ matmul as training computes it under bf16 autocast / in fp32 (model/ops.py)."""
    from moetron.model.ops import linear

    a, b = torch.randn(size, size), torch.randn(size, size)

    def best(dtype: torch.dtype | None) -> float:
        context = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        times = []
        with context:
            linear(a, b)
            for _ in range(repeats):
                start = time.perf_counter()
                linear(a, b)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / best(None)
