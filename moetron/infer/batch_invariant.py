"""Batch-invariant kernels: a token's numbers must not depend on which other tokens share its step.

Measured on this repo's CPU build (MKL sgemm/bmm, AVX2, 1-8 threads; benchmarks/batch_invariance.py
re-runs the probes):
  * A matmul's row results depend on the row count M: M = 1 runs gemv, small M other kernels, and
    some shapes (e.g. an attention value product with head_dim 10) give odd and even M different
    bits. Padding the rows with zeros to a multiple of ROW_GRANULE (= 4; 8 and 16 work too, 2 does
    not) gave identical rows for every M from 1 to 700, at 1, 2, 4 and 8 threads, for every (K, N)
    tried (K, N in 5..256, 211). So every token-dimension matmul of the serving path pads: the same
    kernels then run for a row alone or in a batch. Cost (benchmarks/batch_invariance.py, dim 512,
    4 layers, 1 thread, shared machine): decode about -45% tokens/s at batch 1, -8..-20% at batch
    16. batch_invariant=False turns it all off. The profile puts it all in aten::mm (76% of a batch-1
    step; 6.6 -> 12.9 ms per step): MKL's 4-row sgemm costs 2-4x a gemv on the same weight (likely
    packing the weight each call), while padding copies, float64 silu and tiled attention are < 5%.
    Cheaper formulations tried (the benchmark re-measures them): W @ x.T with the rows as columns,
    MKL's prepacked _mkl_linear, and F.linear under MKL_CBWR=AVX2,STRICT all give M-dependent bits;
    a per-row bmm (weight expanded, not copied) is invariant and near gemv speed for one row (batch
    1: -15%) but 2.5-4x a gemm at 16 rows (batch 16: -35%); using it for the experts only (few rows
    each per decode step) gave -37% / -18% but would slow prefill's expert products ~3x. None
    reaches 10% at both batch sizes on this CPU, so the padded gemm stays.
    Narrow outputs (N < 16) with a small K also made a row's bits depend on its *place* among the
    rows; padding N to MIN_COLUMNS fixed every case found.
  * `F.silu`'s vectorised loop leaves a scalar tail (glibc expf instead of Sleef's), so an element's
    value depended on its position in the tensor; computing it in float64 and rounding makes both
    paths agree (they differ by < 1 float64 ulp, far below float32's rounding step).
  * Attention: paged_attention.py pads its query rows the same way and sums its value product
    over fixed-size key tiles (one product over all keys summed in an order set by the key count).
Row-wise ops (RMSNorm, softmax, top-k, log_softmax, RoPE's cos/sin) measured invariant as they are.
Training never sees any of this: the hooks in model/ops.py are installed only inside `enabled()`.

Legend: M rows, K input width, N output width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from moetron.model import ops

ROW_GRANULE = 4
# Below this many output columns MKL's kernels made a row's bits depend on its place in the matrix
# (N <= 10 with K <= 17, and a value product with head_dim 10): such products are padded to it.
MIN_COLUMNS = 16


def pad_rows(x_MK: torch.Tensor) -> torch.Tensor:
    """Zero rows appended (dim -2) up to a multiple of ROW_GRANULE."""
    num_rows = x_MK.shape[-2]
    padded = -(-num_rows // ROW_GRANULE) * ROW_GRANULE
    return x_MK if padded == num_rows else F.pad(x_MK, (0, 0, 0, padded - num_rows))


def invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with per-row results independent of the number of rows and of a row's place."""
    num_rows, num_out = x.numel() // x.shape[-1], weight.shape[0]
    if num_out < MIN_COLUMNS:  # e.g. a router over 4 experts (the weight is tiny: padding is free)
        weight = F.pad(weight, (0, 0, 0, MIN_COLUMNS - num_out))
    out_MN = ops.plain_linear(pad_rows(x.reshape(num_rows, x.shape[-1])), weight)
    return out_MN[:num_rows, :num_out].reshape(*x.shape[:-1], num_out)


def invariant_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x.double()).to(x.dtype)


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Install the invariant kernels in model/ops.py for the duration (no-op when `on` is False)."""
    if not on:
        yield
        return
    saved = ops.serving_linear, ops.serving_silu
    ops.serving_linear, ops.serving_silu = invariant_linear, invariant_silu
    try:
        yield
    finally:
        ops.serving_linear, ops.serving_silu = saved
