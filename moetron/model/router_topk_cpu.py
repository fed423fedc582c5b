"""The router's top-k choice and its weights as one autograd node, a kernel each way (CPU training).

torch's top-k over [T, E] probabilities, the gather of the chosen ones, their renormalisation and
the backward of each (a scatter into zeros, two reductions) took ~0.6 ms a layer at the demo's 4,096
tokens x 16 experts; the kernels (moe_train_avx2.cpp) take a few dozen microseconds. The weights
are torch's bits; ties in the biased scores go to the lower expert (torch.topk's choice among
equal values is unspecified).
"""

from __future__ import annotations

import torch

from moetron.kernels import cpu_kernels


def topk_routing(
    probs_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights_TK, expert_ids_TK) as Router computes them, for training on plain fp32 CPU tensors
    (None elsewhere: the caller's torch ops)."""
    if not (
        torch.is_grad_enabled()
        and probs_TE.requires_grad
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (probs_TE, bias_E))
        and probs_TE.dtype == bias_E.dtype == torch.float32
        and probs_TE.shape[-1] <= 64
        and cpu_kernels.available()
    ):
        return None
    return TopKRouting.apply(probs_TE.contiguous(), bias_E.contiguous(), top_k, normalize)


class TopKRouting(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, probs_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, normalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights_TK, ids_TK = cpu_kernels.moe_topk(probs_TE, bias_E, top_k, normalize)
        ctx.mark_non_differentiable(ids_TK)
        ctx.save_for_backward(weights_TK, probs_TE, ids_TK)
        ctx.normalize = normalize
        return weights_TK, ids_TK

    @staticmethod
    def backward(ctx, dweights_TK: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        weights_TK, probs_TE, ids_TK = ctx.saved_tensors
        dprobs_TE = cpu_kernels.moe_topk_backward(
            dweights_TK.contiguous(), weights_TK, probs_TE, ids_TK, ctx.normalize
        )
        return dprobs_TE, None, None, None
