"""Shared benchmark plumbing: thread setup, interleaved timing, matmul peak, Mixtral twins, tables.

Timing protocol: after a warmup, the candidates run *interleaved* (A, B, C, A, B, C, ...) and
each reports its median. On a small shared machine the background load drifts over a run;
interleaving lets that drift hit every candidate alike, so the ratios stay meaningful even when
the absolute numbers wobble.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetron import hardware
from moetron.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup_threads(threads: int | None) -> int:
    """Apply --threads (default: torch's own choice) and return the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_line() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} before start"
    )


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


NOISY_CORES = 0.2  # a sample during which other processes used more than this is set aside


class CpuMeter:
    """CPU that *other* processes (and the hypervisor) have used since construction, in cores:
    on a 2-core machine one busy neighbour halves the cores and stalls every parallel region."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def others_cores(self) -> float | None:
        busy = _busy_cpu_s()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        return max(0.0, (busy - self.busy) - (self._own() - self.own)) / wall

    def line(self) -> str:
        others = self.others_cores()
        if others is None:
            return "background load: unknown (no /proc/stat)"
        verdict = "quiet" if others < 0.1 else "NOISY: absolute numbers unreliable, rerun on an idle machine"
        return f"background load during the run: other processes used {others:.2f} of {os.cpu_count()} cores ({verdict})"


@dataclass
class Timing:
    """Samples of one candidate: (seconds, cores other processes used meanwhile or None)."""

    samples: list[tuple[float, float | None]]

    def _clean(self) -> list[float]:
        return [t for t, others in self.samples if others is None or others < NOISY_CORES]

    @property
    def median_s(self) -> float:
        """Median over the samples no other process disturbed, or over all if none was clean."""
        return statistics.median(self._clean() or [t for t, _ in self.samples])

    @property
    def count(self) -> str:
        """'clean/total' samples."""
        return f"{len(self._clean())}/{len(self.samples)}"


def _sample(fn: Callable[[], object]) -> tuple[float, float | None]:
    meter = CpuMeter()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, meter.others_cores()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = 20.0,
    min_rounds: int = 2,
    retry_below_s: float = 3.0,
    max_retries: int = 3,
) -> dict[str, Timing]:
    """Median-of-repeats timing of several candidates, run round-robin after `warmup` rounds.

    No new round starts once `budget_s` has passed and `min_rounds` rounds are done: bf16 on a
    CPU without native bf16 can take many seconds per call. When candidates differ a lot in
    speed, a fast one runs up to `repeats` times per round (as many as fit in the slowest one's
    time), so its median does not rest on two samples that one noisy moment can spoil. A sample
    during which other processes took more than NOISY_CORES is kept but left out of the median;
    candidates faster than `retry_below_s` get up to `max_retries` extra calls per round to
    replace such samples.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start = time.perf_counter()
    samples = {name: [_sample(fn)] for name, fn in fns.items()}
    first = {name: s[0][0] for name, s in samples.items()}
    slowest = max(first.values())
    per_round = {name: min(repeats, max(1, int(slowest / t))) for name, t in first.items()}
    for round_number in range(2, repeats + 1):
        if round_number > min_rounds and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            wanted = per_round[name]
            calls_left = wanted + (max_retries if first[name] < retry_below_s else 0)
            while wanted and calls_left:
                t, others = _sample(fn)
                samples[name].append((t, others))
                calls_left -= 1
                if others is None or others < NOISY_CORES:
                    wanted -= 1
    return {name: Timing(s) for name, s in samples.items()}


def matmul_peak_gflops(
    dtype: torch.dtype, n: int = 2048, repeats: int = 3, device: torch.device | str = "cpu"
) -> float:
    """Best GFLOP/s of one large square F.linear in `dtype`: the ceiling a model can approach on
    this machine with this thread count. Best rather than median: a peak is an upper bound."""
    if torch.device(device).type == "cuda":
        # 2048^3 is launch-bound on a GPU: hardware's GPU size, synchronised
        return hardware.matmul_peak_flops(dtype, str(device), repeats=10) / 1e9
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    F.linear(a, b)  # warmup: oneDNN primitive creation, page faults
    best = min(_sample(lambda: F.linear(a, b))[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def read_bandwidth_gbs(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best GB/s at which a sum streams a tensor far larger than the caches: the rate batch-1
    decode can read weights at (it reads each once per token, writes almost nothing). Best
    rather than median: like the matmul peak, an upper bound."""
    x = torch.ones(num_bytes // 4)
    x.sum()  # warmup: page faults
    best = min(_sample(x.sum)[0] for _ in range(repeats))
    return num_bytes / best / 1e9


def measure_peaks(
    dtypes: Sequence[str], peaks: dict[str, float] | None = None, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Peak GFLOP/s per dtype name. Pass the dict from the start of a run again at its end: it is
    updated in place to the better of the two, so one busy moment cannot fake a low peak."""
    peaks = {} if peaks is None else peaks
    for name in dtypes:
        peaks[name] = max(peaks.get(name, 0.0), matmul_peak_gflops(DTYPES[name], device=device))
    return peaks


@dataclass
class PeakShare:
    """A table cell: achieved GFLOP/s as a fraction of a peak, read when printed (so the peaks
    re-measured at the end of the run count)."""

    gflops: float
    peaks: dict[str, float]
    dtype_name: str

    def __str__(self) -> str:
        return f"{self.gflops / self.peaks[self.dtype_name]:.0%}"


def peak_line(peaks: dict[str, float], device: torch.device | str = "cpu") -> str:
    parts = ", ".join(f"{name} {gflops:.0f} GFLOP/s" for name, gflops in peaks.items())
    if torch.device(device).type == "cuda":
        return f"peak matmul (F.linear 8192^3): {parts} ({torch.cuda.get_device_name(device)})"
    return f"peak matmul (F.linear 2048^3): {parts} (this CPU: {hardware.detect().cpu.isa}, native bf16={hardware.native_bf16_matmul()})"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """First column left-aligned, the others right-aligned, a rule under the header."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- The Hugging Face side ----------------------------------------------------------------------


def quiet_transformers() -> None:
    """No progress bars or advisory warnings between the table rows."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def mixtral_config(cfg: ModelConfig, experts_implementation: str | None = None):
    """A transformers MixtralConfig equivalent to `cfg`, via the project's own converter.

    The embedded full moetron config is dropped so that loading the saved directory goes through
    the plain-Mixtral path of `from_pretrained`, as it would for a checkpoint from the Hub.
    Dropout and router jitter are off; router logits are not returned (no HF aux loss).
    """
    from transformers import MixtralConfig

    from moetron.convert.hf import to_hf_config

    fields = to_hf_config(cfg, torch.float32)
    for key in ("moetron", "architectures", "model_type", "torch_dtype", "rope_theta"):
        fields.pop(key, None)
    return MixtralConfig(
        **fields,
        attn_implementation="sdpa",
        experts_implementation=experts_implementation,
        output_router_logits=False,
        use_cache=False,
    )


def hf_experts_default() -> str:
    """The experts implementation transformers picks when none is requested (on this machine)."""
    from transformers import MixtralForCausalLM

    from moetron.config import tiny

    return MixtralForCausalLM(mixtral_config(tiny())).config._experts_implementation


def hf_experts_options() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    # deepgemm and sonicmoe are CUDA kernels; eager is the per-expert loop in the modeling file.
    return [name for name in ("grouped_mm", "batched_mm") if name in ALL_EXPERTS_FUNCTIONS] + ["eager"]


def batched_mm_bytes(num_tokens: int, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """batched_mm gathers each routed pair's expert weights: [T*K, 2I, D] + [T*K, D, I]."""
    moe = cfg.moe
    per_pair = 3 * moe.expert_hidden_dim * cfg.dim
    return num_tokens * moe.top_k * per_pair * torch.empty(0, dtype=dtype).element_size()


TARGETS = {"fp32": 1.0, "bf16": 2.0}  # moetron speed / fastest transformers, from the issue


def print_summary(summary: Sequence[tuple[str, str, float, str]], targets: bool = True) -> None:
    """Lines of (dtype, pass, speedup of moetron over the fastest HF candidate, that candidate), each
    against its CPU target unless `targets` is False (the targets are the CPU issue's)."""
    for dtype_name, mode, speedup, fastest in summary:
        line = f"{dtype_name} {mode}: moetron {speedup:.2f}x transformers (fastest HF: {fastest})"
        if targets:
            target = TARGETS[dtype_name]
            line += f"; {'meets' if speedup >= target else 'MISSES'} the >= {target:.1f}x target"
        print(line)
