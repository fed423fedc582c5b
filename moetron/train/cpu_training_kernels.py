"""Every CPU training kernel moetron has, installed on a model (or a pipeline stage) from outside in
one call: the MoE layers' routing and row moves (moe_cpu_kernels.py), the attention
(attention_cpu.py), the RMSNorms (norm_cpu.py) and the loss's per-row work (loss_cpu.py). Each
applies where its inputs suit it (plain CPU tensors of the dtypes it takes) and leaves torch's ops
everywhere else."""

from __future__ import annotations

from torch import nn

from moetron.train import attention_cpu, loss_cpu, moe_cpu_kernels, norm_cpu


def install(model: nn.Module) -> list[str]:
    """The names of the kernels installed on `model`: none where this machine has no kernels, or
    where the model is not on the CPU (no build of kernels that would never run)."""
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return []
    installers = {
        "moe": moe_cpu_kernels.install,
        "attention": attention_cpu.install,
        "norm": norm_cpu.install,
        "loss": loss_cpu.install,
    }
    return [name for name, install_one in installers.items() if install_one(model)]
