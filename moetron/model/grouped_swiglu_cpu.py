"""The experts' SwiGLU over expert-sorted rows as one autograd node, for CPU training (fp32, or bf16
where the CPU multiplies bf16 natively).

Legend: N routed rows in expert order, D model width, I expert hidden width, E experts.

Autograd through a per-expert loop of `F.linear` records ~10 nodes per expert and, in backward,
stacks the per-expert weight gradients (`unbind`'s backward) and concatenates the per-expert input
gradients (`split`'s backward): three [E, I, D] copies and one [N, D] copy per layer, plus every
intermediate saved. This node writes each expert's products straight into slices of preallocated
outputs (`torch.mm(..., out=)`, or one `torch.bmm` over all experts where `expert_rows` pads them
to one size), saves only the two pre-activations, and runs the activation and its gradient
(autograd's own silu_backward) once over all rows instead of once per expert. The result equals
the loop's up to rounding: the order of two additions (dx = dh1 @ w1 + dh3 @ w3), and in bf16 the
batched kernels' own.
"""

from __future__ import annotations

from collections.abc import Callable

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
    padded, runs = expert_rows(sizes, dtype, w1_EID.shape[1] * w1_EID.shape[2])
    with torch.autocast("cpu", enabled=False):
        if padded == sizes:
            return GroupedSwiGLU.apply(x_ND, runs, w1_EID, w2_EDI, w3_EID)
        rows_N = rows_in_padded(sizes, padded, x_ND.device)
        x_PD, row_of_padded_P = _pad_rows(x_ND, rows_N, sum(padded))
        y_PD = GroupedSwiGLU.apply(x_PD, runs, w1_EID, w2_EDI, w3_EID)
        return move_rows(y_PD, rows_N, row_of_padded_P)


# (first expert, experts, rows each) of a run of consecutive experts whose blocks have one size:
# each of its products is one batched matmul over the run (a plain matmul for a single expert).
Run = tuple[int, int, int]


def expert_rows(sizes: list[int], dtype: torch.dtype, weight_elements: int) -> tuple[list[int], list[Run]]:
    """The rows each expert's block takes in the buffer its matmuls read (its own rows plus zero
    padding, which add nothing to any gradient), and the runs of experts whose products are each
    one matmul call. `weight_elements`: one expert weight matrix's size (D * I).

    fp32: the rows as they are, one expert a call. bf16: oneDNN, which runs PyTorch's bf16 matmuls
    on CPUs, compiles a kernel for every new shape: with each expert's row count new at every
    step, each of its matmuls paid a compilation (2.3 ms instead of 0.09 ms measured for 300-500
    rows of 128 x 256). Rows are therefore padded to one of 16 sizes per octave (`bucket_rows`),
    whose kernels stay cached. Where that costs less than the calls it saves, every expert is
    padded to the busiest one's size and one batched matmul runs them all: 16 experts'
    [128, 512] x [512, 512] ran at 630 GFLOP/s as 16 calls, 790 as one; 64 of [128, 512] x
    [512, 128] at 360 and 720. Every buffer then has one of a few sizes, so the heap stops growing
    (per-step sizes kept faulting in thousands of fresh pages a step). Runs of some but not all
    experts were tried: their shapes also vary in the expert count, and compiling those cost more
    than the calls they saved (64 experts, demo shape: 17.5-23.1 s for 90 steps vs 17.2-17.6)."""
    if dtype == torch.float32:
        return sizes, [(expert, 1, size) for expert, size in enumerate(sizes) if size]
    own = [bucket_rows(size) for size in sizes]
    busiest = max(own, default=0)
    call_rows = CALL_FLOPS // (2 * weight_elements)
    per_expert = sum(call_rows + rows for rows in own if rows)
    if busiest and call_rows + len(sizes) * busiest <= per_expert:
        return [busiest] * len(sizes), [(0, len(sizes), busiest)]
    return own, [(expert, 1, rows) for expert, rows in enumerate(own) if rows]


# What one more matmul call costs, in the FLOPs it could have done instead: ~20 us at ~800 GFLOP/s
# (bf16, 2-core EPYC; 16 x [128, 512] x [512, 512] took 1.70 ms as 16 calls, 1.36 as one). This
# puts the crossover for the demo's 16 experts at 1.45x padding, where it was measured, and for
# 64 fine-grained experts of width 64 at 2.9x (a fixed 1.4x had made their steps ~1.4x slower).
CALL_FLOPS = 16_000_000


# out = a @ b, or out += a @ b where the flag is set: one matrix (or batched) product.
Product = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]
# Runs groups of products: each group's in order (a later one may add into an earlier one's
# output), the groups in any order or at once (they write disjoint outputs).
GroupedMatmuls = Callable[[list[list[Product]]], None]


def torch_matmuls(groups: list[list[Product]]) -> None:
    """One product after another: torch's matmuls, each over all threads. A faster GroupedMatmuls
    with the same results can be installed from outside (train/moe_cpu_kernels.py)."""
    for group in groups:
        for a, b, out, accumulate in group:
            (_add_matmul if accumulate else _matmul)(a, b, out)


def swiglu_forward(
    x_SD: torch.Tensor,
    runs: list[Run],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
    matmuls: GroupedMatmuls = torch_matmuls,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts on buffer rows laid out in `runs` (expert_rows): (y_SD, and the pre-activations
    h1, h3 that `swiglu_backward` needs). Each product is written into slices of preallocated
    outputs, each run's products one group of `matmuls`. Plain tensors, no autograd:
    GroupedSwiGLU's and routed_swiglu_cpu's shared math."""
    x_SD = x_SD.contiguous()
    num_rows, hidden = x_SD.shape[0], w1_EID.shape[1]
    h1_SI, h3_SI = x_SD.new_empty(num_rows, hidden), x_SD.new_empty(num_rows, hidden)
    y_SD = x_SD.new_empty(num_rows, w2_EDI.shape[1])
    blocks = _run_blocks(runs)
    groups = []
    for experts, rows, shape in blocks:
        x, hidden_shape = x_SD[rows].view(shape), (*shape[:-1], hidden)
        groups.append([
            (x, _t(w1_EID[experts]), h1_SI[rows].view(hidden_shape), False),
            (x, _t(w3_EID[experts]), h3_SI[rows].view(hidden_shape), False),
        ])  # fmt: skip
    matmuls(groups)
    g_SI = F.silu(h1_SI).mul_(h3_SI)  # the activation over all rows at once
    matmuls([
        [(g_SI[rows].view(*shape[:-1], hidden), _t(w2_EDI[experts]), y_SD[rows].view(shape), False)]
        for experts, rows, shape in blocks
    ])  # fmt: skip
    return y_SD, h1_SI, h3_SI


def swiglu_backward(
    dy_SD: torch.Tensor,
    runs: list[Run],
    saved: tuple[torch.Tensor, ...],
    matmuls: GroupedMatmuls = torch_matmuls,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_SD, dw1, dw2, dw3) of `swiglu_forward`; saved = (x_SD, h1, h3, w1, w2, w3)."""
    x_SD, h1_SI, h3_SI, w1_EID, w2_EDI, w3_EID = saved
    dy_SD = dy_SD.contiguous()
    hidden = h1_SI.shape[1]
    blocks = _run_blocks(runs)
    # dg = dy @ w2[e] per run, then the SwiGLU's elementwise gradient over all rows at once:
    # five whole-buffer passes instead of ten small ones per run.
    dg_SI = torch.empty_like(h1_SI)
    matmuls([
        [(dy_SD[rows].view(shape), w2_EDI[experts], dg_SI[rows].view(*shape[:-1], hidden), False)]
        for experts, rows, shape in blocks
    ])  # fmt: skip
    g_SI, dh1_SI, dh3_SI = _swiglu_backward(dg_SI, h1_SI, h3_SI)
    dx_SD = torch.empty_like(x_SD)
    dw1_EID, dw2_EDI, dw3_EID = (torch.empty_like(w) for w in (w1_EID, w2_EDI, w3_EID))
    busy = {expert for first, count, _ in runs for expert in range(first, first + count)}
    idle = sorted(set(range(w1_EID.shape[0])) - busy)
    for dw in (dw1_EID, dw2_EDI, dw3_EID):  # an expert without rows: a zero gradient, as in the loop
        dw[idle] = 0
    groups = []
    for experts, rows, shape in blocks:
        hidden_shape = (*shape[:-1], hidden)
        x, dh1, dh3 = x_SD[rows].view(shape), dh1_SI[rows].view(hidden_shape), dh3_SI[rows].view(hidden_shape)
        dx = dx_SD[rows].view(shape)
        groups.append([
            (_t(dy_SD[rows].view(shape)), g_SI[rows].view(hidden_shape), dw2_EDI[experts], False),
            (_t(dh1), x, dw1_EID[experts], False),
            (_t(dh3), x, dw3_EID[experts], False),
            (dh1, w1_EID[experts], dx, False),
            (dh3, w3_EID[experts], dx, True),  # after the one before: both write dx
        ])  # fmt: skip
    matmuls(groups)
    return dx_SD, dw1_EID, dw2_EDI, dw3_EID


def _run_blocks(runs: list[Run]) -> list[tuple[int | slice, slice, tuple[int, ...]]]:
    """For each run: the weights' index (an expert, or a slice of experts), its buffer rows, and the
    shape its rows take ([rows, -1], or [experts, rows, -1])."""
    blocks, start = [], 0
    for first, count, rows in runs:
        span = slice(start, start + count * rows)
        if count == 1:
            blocks.append((first, span, (rows, -1)))
        else:
            blocks.append((slice(first, first + count), span, (count, rows, -1)))
        start += count * rows
    return blocks


def _t(m: torch.Tensor) -> torch.Tensor:
    """A matrix's (or each batched matrix's) transpose."""
    return m.transpose(-2, -1)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, for matrices or batches of them."""
    (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)


def _add_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out += a @ b, for matrices or batches of them."""
    (out.baddbmm_ if a.dim() == 3 else out.addmm_)(a, b)


def _pad_rows(x_ND: torch.Tensor, rows_N: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_ND's rows placed at rows_N of num_rows zero rows, and the map back (row_moves)."""
    source_R = inverse_map(rows_N, num_rows)
    return move_rows(x_ND, source_R, rows_N), source_R


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


class GroupedSwiGLU(torch.autograd.Function):
    """y[rows of e] = (silu(x w1[e]^T) * (x w3[e]^T)) w2[e]^T for each expert e's rows, laid out in
    runs (expert_rows). Saves x and the two pre-activations; an expert's zero rows give it a zero
    weight gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_SD: torch.Tensor,
        runs: list[Run],
        w1_EID: torch.Tensor,
        w2_EDI: torch.Tensor,
        w3_EID: torch.Tensor,
    ) -> torch.Tensor:
        ctx.runs, x_SD = runs, x_SD.contiguous()
        y_SD, h1_SI, h3_SI = swiglu_forward(x_SD, runs, w1_EID, w2_EDI, w3_EID)
        ctx.save_for_backward(x_SD, h1_SI, h3_SI, w1_EID, w2_EDI, w3_EID)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: torch.Tensor):  # type: ignore[override]
        dx_SD, *dws = swiglu_backward(dy_SD, ctx.runs, ctx.saved_tensors)
        return dx_SD, None, *dws


def _swiglu_backward(
    dg: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For g = silu(h1) * h3 and its gradient dg (overwritten): (g, dh1, dh3)."""
    silu = F.silu(h1)
    dh3 = dg.mul(silu)
    return silu.mul_(h3), torch.ops.aten.silu_backward(dg.mul_(h3), h1), dh3
