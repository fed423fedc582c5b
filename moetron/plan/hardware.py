"""Accelerators, interconnects and prices the planner knows, plus a probe that measures this CPU.

Figures are vendor datasheet peaks (dense, no 2:4 sparsity). Bandwidths are per device and per
direction: an "NVLink 900 GB/s" H100 moves 450 GB/s each way, and that is what a ring collective
can use. What a real kernel or collective reaches is a fraction of these peaks; those fractions
(`matmul_efficiency`, COMM_EFFICIENCY) are the planner's main assumptions and are printed with
every plan.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

GB = 1e9
GiB = 2**30
TFLOPS = 1e12

# NCCL/ICI collectives reach about this share of the per-direction link bandwidth at the large
# message sizes training uses (nccl-tests bus bandwidth: ~230 of 300 GB/s on A100 NVLink,
# ~350-370 of 450 on H100, ~40 of 50 GB/s per 400G NIC).
COMM_EFFICIENCY = 0.75


@dataclass(frozen=True)
class Price:
    """On-demand rental price of one device, with where it comes from."""

    usd_per_gpu_hour: float
    instance: str  # e.g. "p4de.24xlarge (8 GPUs) $40.97/h"
    source: str  # provider and date of the list price


@dataclass(frozen=True)
class Accelerator:
    """One accelerator type. Bandwidths are bytes/s per device per direction."""

    name: str
    peak_bf16_flops: float  # dense tensor-core FLOP/s
    peak_fp8_flops: float | None  # None: no FP8 tensor cores
    memory_bytes: float
    hbm_bytes_per_s: float
    scale_up_bytes_per_s: float  # NVLink/NVSwitch (TPU: ICI), per direction
    scale_up_size: int  # devices sharing that fabric (a node; a TPU slice)
    network_bytes_per_s: float  # scale-out NIC bandwidth per device (InfiniBand/EFA/DCN)
    matmul_efficiency: float  # share of peak large training GEMMs reach (see module docstring)
    price: Price | None
    notes: str = ""

    @property
    def usable_memory_bytes(self) -> float:
        """What a training or serving process can fill: minus CUDA context, NCCL buffers and
        allocator fragmentation (assumed 2 GiB + 5%)."""
        return self.memory_bytes * 0.95 - 2 * GiB


def _price(instance_usd_per_hour: float, gpus: int, instance: str, source: str) -> Price:
    return Price(
        instance_usd_per_hour / gpus,
        f"{instance} ({gpus} GPUs) ${instance_usd_per_hour:,.2f}/h",
        source,
    )


AWS_2024 = "AWS EC2 on-demand list price, us-east-1, 2024 (before the June 2025 cuts)"

ACCELERATORS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(
        "A100-SXM4-40GB", 312 * TFLOPS, None, 40 * GB, 1555 * GB, 300 * GB, 8, 25 * GB, 0.80,
        _price(32.77, 8, "p4d.24xlarge", AWS_2024),
        "NVLink3 600 GB/s bidirectional; 200 Gb/s HDR InfiniBand per GPU (DGX/Azure NDv4; "
        "AWS p4d has 400 Gb/s EFA per 8 GPUs)",
    ),
    "a100-80gb": Accelerator(
        "A100-SXM4-80GB", 312 * TFLOPS, None, 80 * GB, 2039 * GB, 300 * GB, 8, 25 * GB, 0.80,
        _price(40.97, 8, "p4de.24xlarge", AWS_2024),
        "NVLink3 600 GB/s bidirectional; 200 Gb/s HDR InfiniBand per GPU (DGX/Azure NDm A100 v4)",
    ),
    "h100": Accelerator(
        "H100-SXM5-80GB", 989 * TFLOPS, 1979 * TFLOPS, 80 * GB, 3350 * GB, 450 * GB, 8, 50 * GB, 0.70,
        _price(98.32, 8, "p5.48xlarge", AWS_2024),
        "NVLink4 900 GB/s bidirectional; 400 Gb/s NDR InfiniBand / EFA per GPU",
    ),
    "h200": Accelerator(
        "H200-SXM-141GB", 989 * TFLOPS, 1979 * TFLOPS, 141 * GB, 4800 * GB, 450 * GB, 8, 50 * GB, 0.70,
        _price(43.26, 8, "p5e.48xlarge",
               "AWS EC2 Capacity Blocks effective rate, Jan 2025 (p5e had no public on-demand rate)"),
        "H100 compute with 141 GB HBM3e",
    ),
    "b200": Accelerator(
        "B200-SXM-180GB", 2250 * TFLOPS, 4500 * TFLOPS, 180 * GB, 8000 * GB, 900 * GB, 8, 50 * GB, 0.70,
        _price(113.93, 8, "p6-b200.48xlarge", "AWS EC2 on-demand list price, us-east-1, mid 2025"),
        "NVLink5 1.8 TB/s bidirectional; HGX B200 (not GB200 NVL72)",
    ),
    "h800": Accelerator(
        "H800-SXM5-80GB", 989 * TFLOPS, 1979 * TFLOPS, 80 * GB, 3350 * GB, 200 * GB, 8, 50 * GB, 0.70,
        Price(2.00, "rental", "DeepSeek-V3 technical report's assumed rental price, Dec 2024"),
        "export-limited H100: NVLink 400 GB/s bidirectional (DeepSeek measures ~160 GB/s)",
    ),
    "tpu-v4": Accelerator(
        "TPU v4", 275 * TFLOPS, None, 32 * GiB, 1200 * GB, 150 * GB, 3072, 3.1 * GB, 0.80,
        Price(3.22, "TPU v4 chip", "Google Cloud on-demand, us-central2, 2023"),
        "ICI 2,400 Gb/s per chip inside a slice (3,072 chips as PaLM used); ~25 Gb/s DCN per chip "
        "between slices",
    ),
}  # fmt: skip


class HardwareError(ValueError):
    """An unknown accelerator name or a hardware setting out of range."""


def accelerator_names() -> list[str]:
    return [*ACCELERATORS, "cpu"]


def get_accelerator(name: str, price_per_gpu_hour: float | None = None) -> Accelerator:
    """A table entry by name ("cpu" probes this machine); optionally with the price replaced."""
    key = name.lower()
    if key == "cpu":
        device = probe_cpu()
    elif key in ACCELERATORS:
        device = ACCELERATORS[key]
    else:
        raise HardwareError(f"unknown GPU {name!r}; choose one of {', '.join(accelerator_names())}")
    if price_per_gpu_hour is not None:
        if price_per_gpu_hour < 0:
            raise HardwareError(f"--price-per-gpu-hour={price_per_gpu_hour} must be >= 0")
        device = dataclasses.replace(
            device, price=Price(price_per_gpu_hour, "per GPU", "given with --price-per-gpu-hour")
        )
    return device


# --- This machine's CPU, measured -----------------------------------------------------------------


def _meminfo_bytes(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s moved (read + write) by a large tensor copy: the CPU's "HBM" bandwidth."""
    import torch

    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


_CPU_CACHE: Accelerator | None = None


def probe_cpu() -> Accelerator:
    """This machine's CPU as an accelerator entry: fp32 matmul FLOP/s and copy bandwidth measured
    (about a second, once per process; moetron/hardware.py), memory from /proc/meminfo. The
    measured matmul rate *is* the achievable rate, so matmul_efficiency is 1. The planner's CPU
    closed loop trains in fp32, so that is the peak it plans with; the notes give the bf16 peak
    where the CPU computes bf16 natively."""
    global _CPU_CACHE
    if _CPU_CACHE is None:
        import torch

        from moetron import hardware

        flops = hardware.matmul_peak_flops(torch.float32)
        cpu = hardware.detect().cpu
        bf16 = (
            f", bf16 {hardware.matmul_peak_flops(torch.bfloat16) / 1e9:.0f} GFLOP/s"
            if cpu.native_bf16_matmul
            else ""
        )
        bandwidth = measure_copy_bandwidth()
        memory = _meminfo_bytes("MemTotal") or 8 * GiB
        _CPU_CACHE = Accelerator(
            name=f"this CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {cpu.isa})",
            peak_bf16_flops=flops,
            peak_fp8_flops=None,
            memory_bytes=memory,
            hbm_bytes_per_s=bandwidth,
            scale_up_bytes_per_s=bandwidth / 2,
            scale_up_size=1,
            network_bytes_per_s=1.25 * GB,  # 10 GbE, should anyone plan several machines
            matmul_efficiency=1.0,
            price=Price(0.0, "owned", "this machine"),
            notes=f"measured: fp32 1024^3 matmul {flops / 1e9:.0f} GFLOP/s{bf16}, copy {bandwidth / GB:.1f} GB/s; "
            f"{hardware.detect().describe()}",
        )
    return _CPU_CACHE
