"""Batch-invariant kernels: a token's numbers must not depend on which other tokens share its step.

  * Matmuls (fp32 on an AVX2 CPU): moetron's own kernel (moetron/kernels/linear_avx2.cpp) computes
    every output element as one fixed-order dot product, so a row's bits do not depend on the row
    count, its place or the thread split, by construction. It is also faster than MKL where decode
    lives (1-32 rows: 1.3-5x, measured in benchmarks/batch_invariance.py) and on par at hundreds of
    rows, so invariance costs nothing there; the engine uses it for small products even with
    batch_invariant=False.
  * Fallback (no AVX2, no compiler, other dtypes): MKL/oneDNN with padded shapes. A matmul's row
    results depend on the row count M there: M = 1 runs gemv, small M other kernels, and some
    shapes (e.g. an attention value product with head_dim 10) give odd and even M different bits.
    Padding the rows with zeros to a multiple of ROW_GRANULE (= 4; 8 and 16 work too, 2 does not)
    gave identical rows for every M from 1 to 700, at 1, 2, 4 and 8 threads, for every (K, N)
    tried (K, N in 5..256, 211). Narrow outputs (N < 16) with a small K also made a row's bits
    depend on its *place* among the rows; padding N to MIN_COLUMNS fixed every case found. This
    path costs about -45% decode tokens/s at batch 1 and -8..-20% at batch 16 (MKL's 4-row sgemm
    costs 2-4x a gemv on the same weight).
  * `F.silu`'s vectorised loop leaves a scalar tail (glibc expf instead of Sleef's), so an element's
    value depended on its position in the tensor; computing it in float64 and rounding makes both
    paths agree (they differ by < 1 float64 ulp, far below float32's rounding step).
  * Attention: paged_attention.py pads its query rows the same way and sums its value product
    over fixed-size key tiles (one product over all keys summed in an order set by the key count).
Row-wise ops (RMSNorm, softmax, top-k, log_softmax, RoPE's cos/sin) measured invariant as they are.
Training never sees any of this: the engine's runner installs these kernels into the model it serves
by swapping module classes (serving_kernels.py).

Legend: M rows, K input width, N output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetron.kernels import cpu_kernels
from moetron.model import ops
from moetron.quant.quantize import weight_format

ROW_GRANULE = 4
# Below this many output columns MKL's kernels made a row's bits depend on its place in the matrix
# (N <= 10 with K <= 17, and a value product with head_dim 10): such products are padded to it.
MIN_COLUMNS = 16


def pad_rows(x_MK: torch.Tensor) -> torch.Tensor:
    """Zero rows appended (dim -2) up to a multiple of ROW_GRANULE."""
    num_rows = x_MK.shape[-2]
    padded = -(-num_rows // ROW_GRANULE) * ROW_GRANULE
    return x_MK if padded == num_rows else F.pad(x_MK, (0, 0, 0, padded - num_rows))


# Up to this many rows our kernel beats MKL's sgemm (benchmarks/batch_invariance.py); above it
# the non-invariant mode hands products to MKL, which is a little faster on large prefills.
SMALL_ROWS = 64


def invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with per-row results independent of the number of rows and of a row's place."""
    if cpu_kernels.supports(x, weight):
        return cpu_kernels.linear_f32(x, weight)
    num_rows, num_out = x.numel() // x.shape[-1], weight.shape[0]
    if num_out < MIN_COLUMNS:  # e.g. a router over 4 experts (the weight is tiny: padding is free)
        weight = F.pad(weight, (0, 0, 0, MIN_COLUMNS - num_out))
    out_MN = ops.linear(pad_rows(x.reshape(num_rows, x.shape[-1])), weight)
    return out_MN[:num_rows, :num_out].reshape(*x.shape[:-1], num_out)


def fast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T by whichever kernel is faster for its row count (not batch-invariant)."""
    if x.numel() // x.shape[-1] <= SMALL_ROWS and cpu_kernels.supports(x, weight):
        return cpu_kernels.linear_f32(x, weight)
    return ops.linear(x, weight)


def fused_routed_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    experts: nn.Module,
) -> torch.Tensor | None:
    """A whole routed-expert layer in one kernel call (batch-invariant; fp32 x on the CPU, the
    experts' weights fp32 or quantized: moetron/quant/quantize.py), else None."""
    w1, w2, w3 = experts.w1, experts.w2, experts.w3
    if not (x_TD.dtype == torch.float32 and x_TD.device.type == "cpu" and cpu_kernels.available()):
        return None
    if torch.is_grad_enabled() and (x_TD.requires_grad or w1.requires_grad):
        return None
    formats = tuple(weight_format(experts, name) for name in ("w1", "w2", "w3"))
    return cpu_kernels.moe_swiglu_f32(x_TD, weights_TK, expert_ids_TK, w1, w2, w3, formats)


def kernel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm by moetron's kernel (row-wise, so invariant either way; just faster), else None."""
    if not cpu_kernels.supports(x, weight):
        return None
    return cpu_kernels.rms_norm_f32(x, weight, eps)


def invariant_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x.double()).to(x.dtype)
