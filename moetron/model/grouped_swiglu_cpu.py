"""The experts' SwiGLU over expert-sorted rows as one autograd node, for CPU training.

Legend: N routed rows in expert order, D model width, I expert hidden width, E experts.

Autograd through a per-expert loop of `F.linear` records ~10 nodes per expert and, in backward,
stacks the per-expert weight gradients (`unbind`'s backward) and concatenates the per-expert input
gradients (`split`'s backward): three [E, I, D] copies and one [N, D] copy per layer, plus every
intermediate saved. This node writes each expert's products straight into slices of preallocated
outputs (`torch.mm(..., out=)`), saves only the two pre-activations, and computes the SwiGLU
gradient in place. The matmuls are the same BLAS calls, so the result equals the loop's up to the
order of two additions (dx = dh1 @ w1 + dh3 @ w3).
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
        start = 0
        for expert, size in enumerate(sizes):
            if size == 0:
                continue
            rows = slice(start, start + size)
            x = x_ND[rows]
            torch.mm(x, w1_EID[expert].t(), out=h1_NI[rows])
            torch.mm(x, w3_EID[expert].t(), out=h3_NI[rows])
            g = F.silu(h1_NI[rows]).mul_(h3_NI[rows])
            torch.mm(g, w2_EDI[expert].t(), out=y_ND[rows])
            start += size
        ctx.sizes = sizes
        ctx.save_for_backward(x_ND, h1_NI, h3_NI, w1_EID, w2_EDI, w3_EID)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND: torch.Tensor):  # type: ignore[override]
        x_ND, h1_NI, h3_NI, w1_EID, w2_EDI, w3_EID = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        dx_ND = torch.empty_like(x_ND)
        dw1_EID, dw2_EDI, dw3_EID = (torch.empty_like(w) for w in (w1_EID, w2_EDI, w3_EID))
        start = 0
        for expert, size in enumerate(ctx.sizes):
            if size == 0:  # an expert without tokens gets a zero gradient, as the loop's would be
                for grad in (dw1_EID, dw2_EDI, dw3_EID):
                    grad[expert].zero_()
                continue
            rows = slice(start, start + size)
            x, dy, h1, h3 = x_ND[rows], dy_ND[rows], h1_NI[rows], h3_NI[rows]
            sig = torch.sigmoid(h1)
            silu = h1 * sig
            torch.mm(dy.t(), silu * h3, out=dw2_EDI[expert])
            dg = torch.mm(dy, w2_EDI[expert])
            dh3 = dg * silu
            # d silu(h)/dh = sig(h) * (1 + h * (1 - sig(h)))
            dh1 = dg.mul_(h3).mul_(sig.mul_(1 + h1 * (1 - sig)))
            torch.mm(dh1.t(), x, out=dw1_EID[expert])
            torch.mm(dh3.t(), x, out=dw3_EID[expert])
            dx = dx_ND[rows]
            torch.mm(dh1, w1_EID[expert], out=dx)
            dx.addmm_(dh3, w3_EID[expert])
            start += size
        return dx_ND, None, dw1_EID, dw2_EDI, dw3_EID
