"""A MoE layer's routed experts (dispatch, the experts' SwiGLU, the weighted combine) as one autograd
node, for CPU training on plain tensors (fp32, or bf16 where the CPU multiplies bf16 natively).

Legend: T tokens, K experts per token, P = T * K (token, k) pairs, N kept pairs in expert order,
S rows of the experts' buffer (N plus padding: grouped_swiglu_cpu.expert_rows), D model width,
E experts.

Composed from autograd ops, the same math moved each token's row four times each way (tokens to
pairs, pairs to padded rows and back, back to pairs), cast it between fp32 and bf16 at every
hop, and recorded ~25 nodes a layer. Here the two maps between pairs and buffer rows are built
once, and each direction is one gather:

  forward   x_TD --cast--> gather to S rows --experts--> y_SD --gather to P pairs, cast--> Σ_k w·y
  backward  dout_TD · w --cast--> gather to S rows --experts'--> dx_SD --gather to P, cast--> Σ_k

The values equal the composed path's bit for bit: casts commute with gathers, and every product
and sum is the same one in the same order (tests/test_model.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetron.model.grouped_swiglu_cpu import (
    Run,
    compute_dtype,
    expert_rows,
    rows_in_padded,
    swiglu_backward,
    swiglu_forward,
    torch_matmuls,
)
from moetron.model.row_moves import dispatch_order, gather_rows


def supports(x_TD: torch.Tensor, w1_EID: torch.Tensor, w2_EDI: torch.Tensor, w3_EID: torch.Tensor) -> bool:
    return compute_dtype(x_TD, w1_EID, w2_EDI, w3_EID) is not None


def routed_swiglu(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    capacity: int | None,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
    moves: type[TorchMoves] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_k weights_TK[t, k] · expert_ids_TK[t, k]'s SwiGLU(x_TD[t]) → [T, D] in x's dtype, and the
    pairs each expert kept [E]). Each expert keeps at most `capacity` pairs (row_moves.dispatch_order;
    None: all). `moves`: the row plan and moves (TorchMoves, or faster ones with its interface that a
    trainer installs), taken where `moves.takes` the tensors. Check `supports` first. The weights are
    cast to the compute dtype by autograd ops, so fp32 masters get fp32 gradients, as under autocast."""
    dtype = compute_dtype(x_TD, w1_EID, w2_EDI, w3_EID)
    assert dtype is not None, "routed_swiglu: check supports first"
    num_experts = w1_EID.shape[0]
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
    if capacity is not None:
        counts_E = counts_E.clamp(max=capacity)
    sizes = counts_E.tolist()
    padded, runs = expert_rows(sizes, dtype, w1_EID.shape[1] * w1_EID.shape[2])
    if moves is None or not moves.takes(x_TD, weights_TK):
        moves = TorchMoves
    slot_P, pair_S = moves.plan(expert_ids_TK, sizes, padded, capacity)
    layout = Layout(padded, runs, sum(padded) > sum(sizes), sum(sizes) < slot_P.shape[0])
    w1_EID, w2_EDI, w3_EID = (w.to(dtype) for w in (w1_EID, w2_EDI, w3_EID))
    with torch.autocast("cpu", enabled=False):
        out_TD = RoutedSwiGLU.apply(x_TD, weights_TK, pair_S, slot_P, layout, moves, w1_EID, w2_EDI, w3_EID)
    return out_TD, counts_E


@dataclass(frozen=True)
class Layout:
    padded: list[int]  # each expert's block of buffer rows (grouped_swiglu_cpu.expert_rows)
    runs: list[Run]  # consecutive experts whose products are each one (batched) matmul
    has_padding: bool  # buffer rows that hold no pair
    has_drops: bool  # pairs that hold no buffer row (over an expert's capacity)


class RoutedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        pair_S: torch.Tensor,
        slot_P: torch.Tensor,
        layout: Layout,
        moves: type[TorchMoves],
        w1_EID: torch.Tensor,
        w2_EDI: torch.Tensor,
        w3_EID: torch.Tensor,
    ) -> torch.Tensor:
        x_SD = moves.dispatch(x_TD, pair_S, weights_TK.shape[1], w1_EID.dtype, layout)
        y_SD, h1, h3 = swiglu_forward(x_SD, layout.runs, w1_EID, w2_EDI, w3_EID, moves.matmuls)
        ctx.layout, ctx.moves, ctx.x_dtype = layout, moves, x_TD.dtype
        ctx.save_for_backward(weights_TK, pair_S, slot_P, y_SD, x_SD, h1, h3, w1_EID, w2_EDI, w3_EID)
        return moves.combine(y_SD, slot_P, weights_TK, x_TD.dtype, layout)

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor):  # type: ignore[override]
        weights_TK, pair_S, slot_P, y_SD, *saved = ctx.saved_tensors
        layout, moves = ctx.layout, ctx.moves
        dy_SD, dweights_TK = moves.combine_backward(
            dout_TD.contiguous(), weights_TK, y_SD, pair_S, slot_P, ctx.needs_input_grad[1], layout
        )
        dx_SD, dw1_EID, dw2_EDI, dw3_EID = swiglu_backward(dy_SD, layout.runs, tuple(saved), moves.matmuls)
        dx_TD = moves.dispatch_backward(dx_SD, slot_P, weights_TK.shape[1], ctx.x_dtype, layout)
        return dx_TD, dweights_TK, None, None, None, None, dw1_EID, dw2_EDI, dw3_EID


class TorchMoves:
    """The row plan and the four moves as torch ops (any dtypes), and the experts' products as
    torch's matmuls (`matmuls`: grouped_swiglu_cpu.GroupedMatmuls). A faster implementation
    installed from outside has the same static methods and the same results."""

    matmuls = staticmethod(torch_matmuls)

    @staticmethod
    def takes(x_TD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
        return True

    @staticmethod
    def plan(
        expert_ids_TK: torch.Tensor, sizes: list[int], padded: list[int], capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_P: each pair's buffer row, or S if dropped; pair_S: each buffer row's pair, or P for
        padding), each expert's kept pairs in dispatch_order's order from the start of its block."""
        pairs_N, _ = dispatch_order(expert_ids_TK, len(padded), capacity)
        slot_N = rows_in_padded(sizes, padded, expert_ids_TK.device)
        num_pairs, num_rows = expert_ids_TK.numel(), sum(padded)
        slot_P = torch.full((num_pairs,), num_rows, dtype=torch.int64, device=slot_N.device)
        pair_S = torch.full((num_rows,), num_pairs, dtype=torch.int64, device=slot_N.device)
        return slot_P.index_put_((pairs_N,), slot_N), pair_S.index_put_((slot_N,), pairs_N)

    @staticmethod
    def dispatch(
        x_TD: torch.Tensor, pair_S: torch.Tensor, top_k: int, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        # a padding row reads pair P, whose token P // K = T is gather_rows' zero row
        return gather_rows(x_TD.to(dtype), pair_S // top_k, layout.has_padding)

    @staticmethod
    def combine(
        y_SD: torch.Tensor, slot_P: torch.Tensor, weights_TK: torch.Tensor, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        """Σ_k weights_TK[t, k] · y of pair (t, k), in `dtype` (a dropped pair's row is zero)."""
        y_TKD = _pair_rows(y_SD, slot_P, weights_TK.shape, dtype, layout)
        return (y_TKD * weights_TK.unsqueeze(-1).to(dtype)).sum(1)

    @staticmethod
    def combine_backward(
        dout_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        y_SD: torch.Tensor,
        pair_S: torch.Tensor,
        slot_P: torch.Tensor,
        weights_grad: bool,
        layout: Layout,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dout_TKD = dout_TD.unsqueeze(1).expand(*weights_TK.shape, -1)
        dweights_TK = None
        if weights_grad:
            dweights_TK = (dout_TKD * _pair_rows(y_SD, slot_P, weights_TK.shape, dout_TD.dtype, layout)).sum(
                -1
            )
        dy_PD = (dout_TKD * weights_TK.unsqueeze(-1).to(dout_TD.dtype)).flatten(0, 1).to(y_SD.dtype)
        return gather_rows(dy_PD, pair_S, layout.has_padding), dweights_TK

    @staticmethod
    def dispatch_backward(
        dx_SD: torch.Tensor, slot_P: torch.Tensor, top_k: int, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        return _pair_rows(dx_SD, slot_P, (-1, top_k), dtype, layout).sum(1)


def _pair_rows(
    rows_SD: torch.Tensor, slot_P: torch.Tensor, shape_TK: tuple[int, int], dtype: torch.dtype, layout: Layout
) -> torch.Tensor:
    """Each pair's buffer row (zero if dropped) in `dtype`, [T, K, D]."""
    return gather_rows(rows_SD, slot_P, layout.has_drops).to(dtype).unflatten(0, shape_TK)
