"""Closing the loop on this machine: predict a CPU training step, run it, compare.

The prediction is the planner's own (plan/training.py, plan/memory.py) with this CPU probed as the
device (hardware.probe_cpu: fp32 matmul FLOP/s, copy bandwidth) and the layout fixed to one
device: fp32 weights, AdamW, no recomputation of the layers; SDPA on the CPU runs a flash kernel,
so the attention probabilities are not stored ("selective" in the planner's terms).

The measurement: forward + backward + AdamW step of moetron.model.Transformer on random tokens,
the fastest of a few steps after warm-up. Peak memory is the rise of the process's resident-set high
water mark (VmHWM in /proc/self/status) over its resident set before the model is built; the
kernel's high water mark is reset first (writing 5 to /proc/self/clear_refs) so earlier peaks of
this process do not count. That is what the operating system had to provide: the allocator's
cached blocks and the optimizer's temporaries included, which is the point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetron.config import ModelConfig
from moetron.model.transformer import Transformer
from moetron.plan.hardware import probe_cpu
from moetron.plan.memory import PRECISIONS, Layout
from moetron.plan.training import LayoutEstimate, TrainingJob, estimate


@dataclass(frozen=True)
class ClosedLoop:
    name: str
    batch: int
    seq_len: int
    predicted: LayoutEstimate
    measured_step_s: float
    measured_peak_bytes: float
    peak_reset: bool  # False: the kernel refused the reset, earlier peaks may be included

    @property
    def step_error(self) -> float:
        return self.predicted.step.total / self.measured_step_s - 1

    @property
    def memory_error(self) -> float | None:
        """None when the process's resident set did not grow (memory the allocator already held
        from earlier work was reused): then there is no peak to compare against."""
        if self.measured_peak_bytes <= 0:
            return None
        return self.predicted.memory.total / self.measured_peak_bytes - 1


def _status_bytes(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def predict(cfg: ModelConfig, batch: int, seq_len: int) -> LayoutEstimate:
    job = TrainingJob(
        cfg=cfg,
        device=probe_cpu(),
        num_gpus=1,
        tokens=batch * seq_len,
        seq_len=seq_len,
        batch_tokens=batch * seq_len,
        precision=PRECISIONS["fp32"],
        fused_optimizer=False,  # torch.optim.AdamW's default on the CPU is foreach
    )
    layout = Layout(tp=1, pp=1, dp=1, ep=1, zero=0, microbatch=batch, recompute="selective")
    return estimate(job, layout)


def run_closed_loop(
    cfg: ModelConfig, batch: int = 4, seq_len: int = 256, steps: int = 5, warmup: int = 3, name: str = "model"
) -> ClosedLoop:
    """Predict, then measure, a training step of `cfg` on this CPU (fp32)."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={cfg.max_seq_len}")
    predicted = predict(cfg, batch, seq_len)  # probes the CPU before the memory baseline
    torch.manual_seed(0)
    baseline = _status_bytes("VmRSS")
    reset = _reset_peak()
    if not reset:
        baseline = _status_bytes("VmHWM")
    model = Transformer.from_config(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]

    def step() -> None:
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_bytes("VmHWM") - baseline
    # best of: the probe that set the prediction is a best-of too, and a shared machine only
    # ever makes a step slower
    return ClosedLoop(name, batch, seq_len, predicted, min(times), peak, reset)


def render(results: list[ClosedLoop]) -> str:
    from moetron.plan.report import table

    cpu = probe_cpu()
    rows = [
        [
            r.name,
            f"{r.batch}×{r.seq_len}",
            f"{r.predicted.step.total * 1e3:,.1f}",
            f"{r.measured_step_s * 1e3:,.1f}",
            f"{r.step_error:+.0%}",
            f"{r.predicted.memory.total / 2**20:,.0f}",
            f"{r.measured_peak_bytes / 2**20:,.0f}",
            "n/a" if r.memory_error is None else f"{r.memory_error:+.0%}",
        ]
        for r in results
    ]
    lines = [f"Closed loop on {cpu.name}: {cpu.notes}"]
    lines += table(
        ["config", "", "predicted ms", "measured ms", "error", "predicted MiB", "measured MiB", "error"], rows
    )
    if any(not r.peak_reset for r in results):
        lines.append("  (the kernel refused to reset VmHWM: measured peaks may include earlier ones)")
    return "\n".join(lines)
