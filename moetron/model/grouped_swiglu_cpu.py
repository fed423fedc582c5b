"""The experts' SwiGLU over expert-sorted rows as one autograd node, for CPU training (fp32, or bf16
where the CPU multiplies bf16 natively).

Legend: N routed rows in expert order, D model width, I expert hidden width, E experts.

Autograd through a per-expert loop of `F.linear` records ~10 nodes per expert and, in backward,
stacks the per-expert weight gradients (`unbind`'s backward) and concatenates the per-expert input
gradients (`split`'s backward): three [E, I, D] copies and one [N, D] copy per layer, plus every
intermediate saved. This node writes each expert's products straight into slices of preallocated
outputs (`torch.mm(..., out=)`), saves only the two pre-activations, and runs the activation and
its gradient (autograd's own silu_backward) once over all rows instead of once per expert. The
matmuls are the same BLAS calls, so the result equals the loop's up to the order of two additions
(dx = dh1 @ w1 + dh3 @ w3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetron.hardware import native_bf16_matmul
from moetron.model.row_moves import inverse_map, move_rows


def compute_dtype(x_ND: torch.Tensor, *weights: torch.Tensor) -> torch.dtype | None:
    """The dtype the loop's `F.linear` calls would compute in, where this node can take them over:
    plain CPU tensors (not DTensor shards) in fp32, or in bf16 (the tensors' own, or CPU autocast's)
    on a CPU with native bf16 matmuls. None elsewhere: half-precision emulation and CUDA's
    grouped_mm keep their own paths."""
    tensors = (x_ND, *weights)
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if any(t.dtype not in (torch.float32, dtype) for t in tensors):
            return None
    elif len({t.dtype for t in tensors}) == 1:
        dtype = x_ND.dtype
    else:
        return None
    if dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16_matmul("cpu")):
        return dtype
    return None


def grouped_swiglu(
    x_ND: torch.Tensor, sizes: list[int], w1_EID: torch.Tensor, w2_EDI: torch.Tensor, w3_EID: torch.Tensor
) -> torch.Tensor:
    """GroupedSwiGLU in the dtype `compute_dtype` names. Under autocast, each stacked weight is cast
    once (not once per expert, as the loop's calls would); the casts are autograd ops, so fp32
    master weights get fp32 gradients, as autocast gives them."""
    dtype = compute_dtype(x_ND, w1_EID, w2_EDI, w3_EID)
    assert dtype is not None, "grouped_swiglu: check compute_dtype first"
    x_ND, w1_EID, w2_EDI, w3_EID = (t.to(dtype) for t in (x_ND, w1_EID, w2_EDI, w3_EID))
    padded, batched = expert_rows(sizes, dtype)
    with torch.autocast("cpu", enabled=False):
        if padded == sizes and not batched:
            return GroupedSwiGLU.apply(x_ND, sizes, w1_EID, w2_EDI, w3_EID)
        rows_N = rows_in_padded(sizes, padded, x_ND.device)
        x_PD, row_of_padded_P = _pad_rows(x_ND, rows_N, sum(padded))
        if batched:
            y_ERD = BatchedSwiGLU.apply(x_PD.view(len(sizes), padded[0], -1), w1_EID, w2_EDI, w3_EID)
            return move_rows(y_ERD.flatten(0, 1), rows_N, row_of_padded_P)
        y_PD = GroupedSwiGLU.apply(x_PD, padded, w1_EID, w2_EDI, w3_EID)
        return move_rows(y_PD, rows_N, row_of_padded_P)


def expert_rows(sizes: list[int], dtype: torch.dtype) -> tuple[list[int], bool]:
    """The rows each expert's block takes in the buffer its matmuls read (its own rows plus zero
    padding), and whether every block has the same size, so that one batched matmul runs them all.

    fp32: the rows as they are. bf16: oneDNN, which runs PyTorch's bf16 matmuls on CPUs, compiles a
    kernel for every new shape and keeps the last 1,024: with each expert's row count new at every
    step, each of its matmuls paid a compilation (2.3 ms instead of 0.09 ms measured for 300-500
    rows of 128 x 256). Rows are therefore padded with zero rows (which add nothing to any
    gradient) to one of 16 sizes per octave, whose kernels stay cached. Where routing is balanced
    enough, every expert is padded to the busiest one's bucket: one batched matmul runs all experts
    (1.0 vs 1.2 ms for 16 x [~560, 128] x [128, 256] as 16 calls), and every buffer has one of a few
    sizes, so the heap stops growing (per-step sizes kept faulting in thousands of fresh pages a
    step). Badly balanced routing pads each expert to its own bucket instead."""
    if dtype == torch.float32:
        return sizes, False
    rows = bucket_rows(max(sizes, default=0))
    if len(sizes) * rows <= MAX_BATCHED_PADDING * sum(sizes):
        return [rows] * len(sizes), True
    return [bucket_rows(size) for size in sizes], False


def swiglu_forward(
    x_PD: torch.Tensor,
    padded: list[int],
    batched: bool,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts on rows laid out as `expert_rows` says: (y_PD, and the pre-activations h1, h3
    that `swiglu_backward` needs). Plain tensors, no autograd: the nodes' and routed_swiglu_cpu's
    shared math."""
    if batched:
        y_ERD, h1, h3 = _batched_forward(x_PD.view(len(padded), padded[0], -1), w1_EID, w2_EDI, w3_EID)
        return y_ERD.flatten(0, 1), h1, h3
    return _grouped_forward(x_PD, _expert_spans(padded), w1_EID, w2_EDI, w3_EID)


def swiglu_backward(
    dy_PD: torch.Tensor,
    padded: list[int],
    batched: bool,
    saved: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_PD, dw1, dw2, dw3) of `swiglu_forward`; saved = (x_PD, h1, h3, w1, w2, w3)."""
    x_PD, h1, h3, w1_EID, w2_EDI, w3_EID = saved
    if batched:
        view = (len(padded), padded[0], -1)
        dx, *dws = _batched_backward(dy_PD.view(view), x_PD.view(view), h1, h3, w1_EID, w2_EDI, w3_EID)
        return dx.flatten(0, 1), *dws
    return _grouped_backward(dy_PD, _expert_spans(padded), x_PD, h1, h3, w1_EID, w2_EDI, w3_EID)


def _pad_rows(x_ND: torch.Tensor, rows_N: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_ND's rows placed at rows_N of num_rows zero rows, and the map back (row_moves)."""
    source_R = inverse_map(rows_N, num_rows)
    return move_rows(x_ND, source_R, rows_N), source_R


# The batched layout's padded rows may be at most this multiple of the routed rows: beyond it the
# wasted products cost more than the per-expert calls save (measured crossover ~1.45x, bf16, EPYC).
MAX_BATCHED_PADDING = 1.4


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 1/16 of its octave: 16 sizes per doubling (exact below 32)."""
    step = 1 << max(rows.bit_length() - 5, 0)
    return -(-rows // step) * step


def rows_in_padded(sizes: list[int], padded: list[int], device: torch.device) -> torch.Tensor:
    """Where each of the sum(sizes) expert-sorted rows sits once every expert's block is padded:
    its own index, moved by the padding of the experts before its own."""
    counts_E = torch.tensor(sizes, device=device)
    padding_E = torch.tensor(padded, device=device) - counts_E
    shift_E = padding_E.cumsum(0) - padding_E
    return torch.arange(sum(sizes), device=device) + torch.repeat_interleave(shift_E, counts_E)


class BatchedSwiGLU(torch.autograd.Function):
    """y[e] = (silu(x[e] w1[e]^T) * (x[e] w3[e]^T)) w2[e]^T for experts padded to equal rows
    x_ERD: each product one batched matmul over all experts. Saves x and the two pre-activations,
    as GroupedSwiGLU does; an expert's zero rows give it a zero weight gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_ERD: torch.Tensor, w1_EID: torch.Tensor, w2_EDI: torch.Tensor, w3_EID: torch.Tensor
    ) -> torch.Tensor:
        y_ERD, h1_ERI, h3_ERI = _batched_forward(x_ERD, w1_EID, w2_EDI, w3_EID)
        ctx.save_for_backward(x_ERD, h1_ERI, h3_ERI, w1_EID, w2_EDI, w3_EID)
        return y_ERD

    @staticmethod
    def backward(ctx, dy_ERD: torch.Tensor):  # type: ignore[override]
        return _batched_backward(dy_ERD, *ctx.saved_tensors)


def _batched_forward(
    x_ERD: torch.Tensor, w1_EID: torch.Tensor, w2_EDI: torch.Tensor, w3_EID: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h1_ERI = torch.bmm(x_ERD, w1_EID.transpose(1, 2))
    h3_ERI = torch.bmm(x_ERD, w3_EID.transpose(1, 2))
    return torch.bmm(F.silu(h1_ERI).mul_(h3_ERI), w2_EDI.transpose(1, 2)), h1_ERI, h3_ERI


def _batched_backward(
    dy_ERD: torch.Tensor,
    x_ERD: torch.Tensor,
    h1_ERI: torch.Tensor,
    h3_ERI: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g_ERI, dh1_ERI, dh3_ERI = _swiglu_backward(torch.bmm(dy_ERD, w2_EDI), h1_ERI, h3_ERI)
    dw2_EDI = torch.bmm(dy_ERD.transpose(1, 2), g_ERI)
    dw1_EID = torch.bmm(dh1_ERI.transpose(1, 2), x_ERD)
    dw3_EID = torch.bmm(dh3_ERI.transpose(1, 2), x_ERD)
    dx_ERD = torch.bmm(dh1_ERI, w1_EID).baddbmm_(dh3_ERI, w3_EID)
    return dx_ERD, dw1_EID, dw2_EDI, dw3_EID


class GroupedSwiGLU(torch.autograd.Function):
    """y[rows of e] = (silu(x w1[e]^T) * (x w3[e]^T)) w2[e]^T for each expert e's contiguous rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_ND: torch.Tensor,
        sizes: list[int],
        w1_EID: torch.Tensor,
        w2_EDI: torch.Tensor,
        w3_EID: torch.Tensor,
    ) -> torch.Tensor:
        x_ND = x_ND.contiguous()
        ctx.spans = _expert_spans(sizes)
        y_ND, h1_NI, h3_NI = _grouped_forward(x_ND, ctx.spans, w1_EID, w2_EDI, w3_EID)
        ctx.save_for_backward(x_ND, h1_NI, h3_NI, w1_EID, w2_EDI, w3_EID)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND: torch.Tensor):  # type: ignore[override]
        dx_ND, *dws = _grouped_backward(dy_ND, ctx.spans, *ctx.saved_tensors)
        return dx_ND, None, *dws


def _grouped_forward(
    x_ND: torch.Tensor,
    spans: list[tuple[int, slice]],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert's products written into slices of preallocated outputs; x_ND contiguous."""
    num_rows, hidden = x_ND.shape[0], w1_EID.shape[1]
    h1_NI, h3_NI = x_ND.new_empty(num_rows, hidden), x_ND.new_empty(num_rows, hidden)
    y_ND = x_ND.new_empty(num_rows, w2_EDI.shape[1])
    for expert, rows in spans:
        torch.mm(x_ND[rows], w1_EID[expert].t(), out=h1_NI[rows])
        torch.mm(x_ND[rows], w3_EID[expert].t(), out=h3_NI[rows])
    g_NI = F.silu(h1_NI).mul_(h3_NI)  # the activation over all rows at once
    for expert, rows in spans:
        torch.mm(g_NI[rows], w2_EDI[expert].t(), out=y_ND[rows])
    return y_ND, h1_NI, h3_NI


def _grouped_backward(
    dy_ND: torch.Tensor,
    spans: list[tuple[int, slice]],
    x_ND: torch.Tensor,
    h1_NI: torch.Tensor,
    h3_NI: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dy_ND = dy_ND.contiguous()
    # dg = dy @ w2[e] per expert, then the SwiGLU's elementwise gradient over all rows at once:
    # five whole-buffer passes instead of ten small ones per expert.
    dg_NI = torch.empty_like(h1_NI)
    for expert, rows in spans:
        torch.mm(dy_ND[rows], w2_EDI[expert], out=dg_NI[rows])
    g_NI, dh1_NI, dh3_NI = _swiglu_backward(dg_NI, h1_NI, h3_NI)
    dx_ND = torch.empty_like(x_ND)
    dw1_EID, dw2_EDI, dw3_EID = (torch.empty_like(w) for w in (w1_EID, w2_EDI, w3_EID))
    idle = sorted(set(range(w1_EID.shape[0])) - {expert for expert, _ in spans})
    for dw in (dw1_EID, dw2_EDI, dw3_EID):  # an expert without tokens: a zero gradient, as in the loop
        dw[idle] = 0
    for expert, rows in spans:
        x, dh1, dh3 = x_ND[rows], dh1_NI[rows], dh3_NI[rows]
        torch.mm(dy_ND[rows].t(), g_NI[rows], out=dw2_EDI[expert])
        torch.mm(dh1.t(), x, out=dw1_EID[expert])
        torch.mm(dh3.t(), x, out=dw3_EID[expert])
        dx = dx_ND[rows]
        torch.mm(dh1, w1_EID[expert], out=dx)
        dx.addmm_(dh3, w3_EID[expert])
    return dx_ND, dw1_EID, dw2_EDI, dw3_EID


def _swiglu_backward(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For g = silu(h1) * h3 and its gradient dg (overwritten): (g, dh1, dh3)."""
    silu = F.silu(h1)
    dh3 = dg.mul(silu)
    return silu.mul_(h3), torch.ops.aten.silu_backward(dg.mul_(h3), h1), dh3


def _expert_spans(sizes: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for each expert that received rows, in order."""
    spans, start = [], 0
    for expert, size in enumerate(sizes):
        if size:
            spans.append((expert, slice(start, start + size)))
        start += size
    return spans
