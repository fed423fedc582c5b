"""The language-model loss fused with the output projection: mean cross-entropy of h @ W^T without
an fp32 [N, V] logits tensor or its gradient.

Legend: N token rows, D model width, V vocabulary.

Computed the usual way, the loss materialises the logits in the matmul's dtype, an fp32 copy, the
log-softmax and, in backward, an fp32 gradient of each: four [N, V] tensors (a 16 x 256 batch at
V = 8192 is 128 MiB apiece) streamed through memory several times. Here the logits are computed
once in the matmul's dtype; each block of rows small enough to stay in cache is taken to fp32, its
loss and its gradient (softmax - one-hot) / count computed there and written back over the logits.
Backward is then just the two matmuls of the projection's own backward. The same math as autograd
through `F.cross_entropy(logits.float(), targets)` (the gradient rounded to the matmul's dtype
where autograd would round it too), up to the order of floating-point sums. Liger-Kernel and
torchtune fuse the loss and projection the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetron.model.ops import linear

IGNORE_INDEX = -100  # F.cross_entropy's default: rows with this target count for nothing
BLOCK_ELEMENTS = 1 << 18  # fp32 logits per block of rows on a CPU: 1 MiB, one core's L2
# On a GPU each block costs ~10 kernel launches: blocks of 512 MiB (the whole batch of a 1B model
# at 16K tokens x 8K vocab) keep the launches few while bounding the fp32 copy.
DEVICE_BLOCK_ELEMENTS = 1 << 27

# (logits_NV, targets_N, ignore_index, weight) -> each row's loss (fp32 [N], 0 on ignored rows), the
# logits overwritten with the gradient (softmax - one-hot) * weight on counted rows, 0 elsewhere;
# None where it does not apply. The block loop below, as one kernel (train/loss_cpu.py).
RowsLoss = Callable[[torch.Tensor, torch.Tensor, int, float], "torch.Tensor | None"]


def linear_cross_entropy(
    h_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    rows_loss: RowsLoss | None = None,
) -> torch.Tensor:
    """Mean over counted rows of cross_entropy(h_ND @ weight_VD^T, targets_N), an fp32 scalar.

    The matmul runs in the dtype `F.linear` would use here: the autocast dtype inside autocast,
    else the operands' (half-precision emulation on CPUs without it: model/ops.py). The casts are
    ordinary autograd ops, so fp32 master weights receive fp32 gradients as under autocast."""
    dtype = (
        torch.get_autocast_dtype(h_ND.device.type) if torch.is_autocast_enabled(h_ND.device.type) else None
    )
    if dtype is not None:
        h_ND, weight_VD = h_ND.to(dtype), weight_VD.to(dtype)
    with torch.autocast(h_ND.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, rows_loss)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h_ND: torch.Tensor,
        weight_VD: torch.Tensor,
        targets_N: torch.Tensor,
        ignore_index: int,
        rows_loss: RowsLoss | None,
    ) -> torch.Tensor:
        h_ND = h_ND.contiguous()
        grad_NV = linear(h_ND, weight_VD)  # the logits, overwritten block by block with their gradient
        counted_N = targets_N != ignore_index
        count = max(int(counted_N.sum()), 1)
        losses_N = None if rows_loss is None else rows_loss(grad_NV, targets_N, ignore_index, 1.0 / count)
        if losses_N is not None:
            ctx.save_for_backward(h_ND, weight_VD, grad_NV)
            return losses_N.sum() / count
        safe_targets_N1 = torch.where(counted_N, targets_N, 0).unsqueeze(1)
        losses_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        block_elements = BLOCK_ELEMENTS if h_ND.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
        rows = max(1, block_elements // grad_NV.shape[1])
        for start in range(0, h_ND.shape[0], rows):
            block = slice(start, start + rows)
            logits_bV = grad_NV[block].float()
            max_b1 = logits_bV.amax(dim=1, keepdim=True)
            target_logit_b1 = logits_bV.gather(1, safe_targets_N1[block])
            # One exp per logit (logsumexp, then softmax, would take two): e = exp(l - max),
            # lse = max + log Σe, softmax = e / Σe.
            exp_bV = logits_bV.sub_(max_b1).exp_()
            sum_b1 = exp_bV.sum(dim=1, keepdim=True)
            losses_N[block] = (max_b1 + sum_b1.log() - target_logit_b1).squeeze(1)
            # d loss / d logits = (softmax - one-hot) / count on counted rows, 0 on the others.
            row_weight_b1 = counted_N[block].unsqueeze(1) / count
            probs_bV = exp_bV.mul_(row_weight_b1 / sum_b1)
            probs_bV.scatter_add_(1, safe_targets_N1[block], -row_weight_b1)
            grad_NV[block] = probs_bV
        ctx.save_for_backward(h_ND, weight_VD, grad_NV)
        return losses_N.masked_fill(~counted_N, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        h_ND, weight_VD, grad_NV = ctx.saved_tensors
        grad_h_ND = linear(grad_NV, weight_VD.t()) if ctx.needs_input_grad[0] else None
        grad_weight_VD = linear(grad_NV.t(), h_ND.t()) if ctx.needs_input_grad[1] else None
        # The loss's own gradient (1, or 1 / accumulation steps) scales the results: x * 1.0 == x.
        scale = grad_loss.to(grad_NV.dtype)
        return (
            None if grad_h_ND is None else grad_h_ND.mul_(scale),
            None if grad_weight_VD is None else grad_weight_VD.mul_(scale),
            None,
            None,
            None,
        )
