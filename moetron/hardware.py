"""What this machine can do, detected once: CPU instruction sets, CUDA devices, measured matmul peaks.

The one place moetron asks about the hardware it runs on: the trainer (its dtype and MFU), the
engine (how a bf16 checkpoint is served), the kernels' build (which ISA to compile for), model/ops
(whether a half matmul is native or emulated) and the planner's `this machine` entry all read it,
so a machine is never taken for the one the code was tuned on.

CPU flags come from /proc/cpuinfo (Linux) and PyTorch's own probes, which also check that the OS
enabled the wider registers (AMX needs a kernel that allows its tile state). Nothing here imports
the rest of moetron.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# oneDNN, which runs PyTorch's bf16 (and AMX) matmuls on CPUs, compiles a kernel per matmul shape
# and keeps the last 1,024 by default; the setting is read when the first one is compiled, so it
# is made here, before any peak is measured. A MoE step's experts meet a few hundred shapes
# (grouped_swiglu_cpu.expert_rows), and any other model in the process (transformers' Mixtral in
# benchmarks/train_throughput.py: a new shape per expert per step) evicted them: small-fine's bf16
# step took 468-536 ms beside it, ~255 alone. A user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

# The CPU flags moetron reports or decides on (Linux /proc/cpuinfo names).
CPU_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)  # fmt: skip


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    num_cores: int
    flags: frozenset[str] = field(default_factory=frozenset)  # the subset of CPU_FLAGS present

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def avx2_fma(self) -> bool:
        """moetron's CPU kernels need these (and F16C, which every AVX2 CPU has: moetron/kernels)."""
        return self.has("avx2") and self.has("fma")

    @property
    def native_bf16_matmul(self) -> bool:
        """bf16 dot products in hardware (AMX tiles or AVX512-BF16): oneDNN's bf16 matmul then runs
        several times faster than fp32 (4.5x measured on an AVX512-BF16 EPYC); without them it is
        emulated at a fraction of fp32 speed."""
        return self.has("amx_bf16") or self.has("avx512_bf16")

    @property
    def isa(self) -> str:
        """The widest vector ISA, as a short name: "amx", "avx512_bf16", "avx512", "avx2" or "baseline"."""
        if self.has("amx_bf16"):
            return "amx"
        if self.has("avx512_bf16"):
            return "avx512_bf16"
        if self.has("avx512f"):
            return "avx512"
        return "avx2" if self.avx2_fma else "baseline"


@dataclass(frozen=True)
class CudaDevice:
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    @property
    def native_bf16_matmul(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and later: bf16 tensor cores


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    cuda: tuple[CudaDevice, ...] = ()

    def native_bf16_matmul(self, device_type: str = "cpu") -> bool:
        if device_type == "cuda":
            return bool(self.cuda) and all(d.native_bf16_matmul for d in self.cuda)
        return self.cpu.native_bf16_matmul

    def describe(self) -> str:
        """One line for logs and notes: CPU, its relevant flags, CUDA devices."""
        flags = " ".join(f for f in CPU_FLAGS if self.cpu.has(f)) or "none of AVX2/AVX-512/AMX"
        line = f"{self.cpu.model_name} ({self.cpu.num_cores} cores; {flags})"
        for d in self.cuda:
            line += f"; CUDA {d.name} sm{d.capability[0]}{d.capability[1]} {d.memory_bytes / 2**30:.0f} GiB"
        return line


def _cpuinfo() -> tuple[str, set[str]]:
    """Model name and flags from /proc/cpuinfo's first processor ("", {} where there is none)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def _torch_cpu_flags() -> set[str]:
    """What PyTorch's own probes say (they also check that the OS enabled the registers)."""
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "avx512_vnni": "_is_vnni_supported",
        "amx_tile": "_is_amx_tile_supported",
        "amx_fp16": "_is_amx_fp16_supported",
    }
    cpu = getattr(torch, "cpu", None)
    return {flag for flag, probe in probes.items() if bool(getattr(cpu, probe, lambda: False)())}


def detect_cpu() -> CpuInfo:
    name, listed = _cpuinfo()
    probed = _torch_cpu_flags()
    flags = {f for f in CPU_FLAGS if f in listed}
    if listed:
        # Listed by the CPU but not enabled by the OS (e.g. AMX without the kernel's permission):
        # PyTorch's probe says no, and neither do we.
        for flag in ("amx_tile", "amx_fp16", "avx512_bf16"):
            if flag in flags and flag not in probed:
                flags.discard(flag)
        if "amx_tile" not in flags:
            flags -= {"amx_bf16", "amx_int8", "amx_fp16"}
    else:  # no /proc/cpuinfo (macOS, Windows): PyTorch's probes only
        flags = probed | ({"fma", "f16c"} if "avx2" in probed else set())  # every AVX2 CPU has both
        if "amx_tile" in probed:
            flags |= {"amx_bf16", "amx_int8"}
    return CpuInfo(name or platform.processor() or platform.machine(), os.cpu_count() or 1, frozenset(flags))


def detect_cuda() -> tuple[CudaDevice, ...]:
    if not torch.cuda.is_available():
        return ()
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(CudaDevice(props.name, (props.major, props.minor), props.total_memory))
    return tuple(devices)


@functools.cache
def detect() -> Hardware:
    """This machine, detected once per process."""
    return Hardware(detect_cpu(), detect_cuda())


def native_bf16_matmul(device_type: str = "cpu") -> bool:
    return detect().native_bf16_matmul(device_type)


def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, device: str = "cpu", size: int | None = None, repeats: int = 5
) -> float:
    """Best FLOP/s of a size³ matmul in `dtype` as moetron computes it on this device: a bf16/fp16
    matmul on a CPU without native half instructions is computed in fp32 (model/ops.py), so its peak
    is fp32's. The denominator of the trainer's MFU and the planner's CPU entry. Cached per process.
    Default size: 1024 on a CPU, 8192 on a GPU (where 1024³ takes about a kernel launch's time)."""
    device_type = torch.device(device).type
    size = size or (8192 if device_type == "cuda" else 1024)
    if dtype in (torch.bfloat16, torch.float16) and device_type == "cpu" and not native_bf16_matmul("cpu"):
        dtype = torch.float32
    return _measure(dtype, device, size, repeats)


def bf16_matmul_speedup(device: str = "cpu") -> float:
    """Measured bf16 / fp32 matmul peak on `device` (1.0 where bf16 is computed in fp32). Instructions
    alone do not settle it: on one AVX512-BF16 Xeon without AMX, oneDNN's bf16 matmul ran at 0.4-0.6x
    fp32's, where an AVX512-BF16 EPYC ran it at 4.5x."""
    return matmul_peak_flops(torch.bfloat16, device) / matmul_peak_flops(torch.float32, device)


@functools.cache
def _measure(dtype: torch.dtype, device: str, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    return 2 * size**3 / best_seconds(lambda: F.linear(a, b), repeats, sync)


def best_seconds(run: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed warm-up call (first calls
    initialise the math library); `sync` waits for an asynchronous device before each reading."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - start)
    return best
