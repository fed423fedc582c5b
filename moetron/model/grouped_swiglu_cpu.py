"""The experts' SwiGLU over expert-sorted rows as one autograd node, for CPU training.

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


def supports(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Plain fp32 CPU tensors outside autocast: where the loop would run full-precision `F.linear`.
    (Half-precision emulation, DTensor shards and CUDA's grouped_mm keep their own paths.)"""
    tensors = (x_ND, *weights)
    return (
        not torch.is_autocast_enabled("cpu")
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    )


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
        num_rows, hidden = x_ND.shape[0], w1_EID.shape[1]
        h1_NI, h3_NI = x_ND.new_empty(num_rows, hidden), x_ND.new_empty(num_rows, hidden)
        y_ND = x_ND.new_empty(num_rows, w2_EDI.shape[1])
        spans = _expert_spans(sizes)
        for expert, rows in spans:
            torch.mm(x_ND[rows], w1_EID[expert].t(), out=h1_NI[rows])
            torch.mm(x_ND[rows], w3_EID[expert].t(), out=h3_NI[rows])
        g_NI = F.silu(h1_NI).mul_(h3_NI)  # the activation over all rows at once
        for expert, rows in spans:
            torch.mm(g_NI[rows], w2_EDI[expert].t(), out=y_ND[rows])
        ctx.spans = spans
        ctx.save_for_backward(x_ND, h1_NI, h3_NI, w1_EID, w2_EDI, w3_EID)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND: torch.Tensor):  # type: ignore[override]
        x_ND, h1_NI, h3_NI, w1_EID, w2_EDI, w3_EID = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        spans = ctx.spans
        # dg = dy @ w2[e] per expert, then the SwiGLU's elementwise gradient over all rows at once:
        # five whole-buffer passes instead of ten small ones per expert.
        dg_NI = torch.empty_like(h1_NI)
        for expert, rows in spans:
            torch.mm(dy_ND[rows], w2_EDI[expert], out=dg_NI[rows])
        silu_NI = F.silu(h1_NI)
        g_NI = silu_NI * h3_NI
        dh3_NI = dg_NI.mul(silu_NI)
        dh1_NI = torch.ops.aten.silu_backward(dg_NI.mul_(h3_NI), h1_NI)
        dx_ND = torch.empty_like(x_ND)
        dw1_EID, dw2_EDI, dw3_EID = (torch.zeros_like(w) for w in (w1_EID, w2_EDI, w3_EID))
        for expert, rows in spans:  # an expert without tokens keeps a zero gradient, as the loop's
            x, dh1, dh3 = x_ND[rows], dh1_NI[rows], dh3_NI[rows]
            torch.mm(dy_ND[rows].t(), g_NI[rows], out=dw2_EDI[expert])
            torch.mm(dh1.t(), x, out=dw1_EID[expert])
            torch.mm(dh3.t(), x, out=dw3_EID[expert])
            dx = dx_ND[rows]
            torch.mm(dh1, w1_EID[expert], out=dx)
            dx.addmm_(dh3, w3_EID[expert])
        return dx_ND, None, dw1_EID, dw2_EDI, dw3_EID


def _expert_spans(sizes: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for each expert that received rows, in order."""
    spans, start = [], 0
    for expert, size in enumerate(sizes):
        if size:
            spans.append((expert, slice(start, start + size)))
        start += size
    return spans
