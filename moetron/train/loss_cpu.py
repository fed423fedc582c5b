"""moetron's kernel for the language-model loss's per-row work on CPU (kernels/lm_loss_avx2.cpp),
installed on a model from outside (`install`): model/loss.py's block loop (a cast to fp32, max,
gather, exp, sum, scale, scatter of the one-hot, a cast back: seven whole-block torch ops) as one
pass a row. Measured at the demo's 4,096 x 8,192 bf16 logits (2-core AVX512-BF16 EPYC): see
`benchmarks/train_throughput.py` and the README.
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.kernels import cpu_kernels
from moetron.model.transformer import Transformer


def install(model: nn.Module) -> bool:
    """Give every Transformer in `model` the kernel for its loss where this machine has the
    kernels (True); else leave the torch ops (False)."""
    if not cpu_kernels.available():
        return False
    for module in model.modules():
        if isinstance(module, Transformer):
            module.loss_rows = lm_loss_rows
    return True


def lm_loss_rows(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int, weight: float
) -> torch.Tensor | None:
    """model/loss.py's RowsLoss for contiguous fp32 or bf16 CPU logits; None elsewhere."""
    if not (
        type(logits_NV) is torch.Tensor
        and logits_NV.device.type == "cpu"
        and logits_NV.dtype in (torch.float32, torch.bfloat16)
        and logits_NV.is_contiguous()
    ):
        return None
    targets_N = targets_N.to(torch.int64).contiguous()
    vocab = logits_NV.shape[1]
    if bool(((targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= vocab))).any()):
        return None  # out of range: the torch ops' gather raises the usual error
    return cpu_kernels.lm_loss_rows(logits_NV, targets_N, ignore_index, weight)
