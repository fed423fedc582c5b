"""moetron's causal attention kernel for CPU training (kernels/attention_train_avx2.cpp), installed
on a model from outside (`install`), as the MoE kernels are (train/moe_cpu_kernels.py).

It runs where training computes attention on plain CPU tensors in bf16 (bf16 weights, or fp32
masters under CPU bf16 autocast) or in fp32; elsewhere (DTensors, CUDA, other dtypes) torch's SDPA
runs. In bf16 the kernel multiplies bf16 pairs with AVX512-BF16's dpbf16ps where the CPU has it
(else two fp32 FMAs a pair); in fp32 with FMAs. It keeps scores, softmax and sums in fp32, and
recomputes P in the backward from each row's log-sum-exp, as FlashAttention does.

Measured (2-core AVX512-BF16 EPYC, 4 x 8 heads x 256 tokens x 64, one kv head): a layer's attention
forward+backward 12.2 ms with torch's SDPA, 3.3 ms with the kernel in bf16; see the README for fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.kernels import cpu_kernels
from moetron.model.rope import apply_rope
from moetron.model.transformer import Attention, Transformer, causal_sdpa

MAX_HEAD_DIM = 256  # the kernel's per-task buffers are sized for rows this wide at most


def install(model: nn.Module) -> bool:
    """Give every Transformer (a whole model or a pipeline stage) in `model` the kernel as its
    attention, and every attention layer the rotary kernel, where this machine has the kernels
    (True); else leave SDPA and the torch ops (False)."""
    if not cpu_kernels.available():
        return False
    for module in model.modules():
        if isinstance(module, Transformer):
            module.default_attention = causal_attention
        elif isinstance(module, Attention):
            module.rotate = rotate
    return True


def rotate(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """model/rope.py's apply_rope in one pass a row, in x's dtype (fp32 or bf16; apply_rope would
    promote bf16 queries to fp32 angles' dtype under autocast, which attention then casts back),
    for plain CPU tensors; apply_rope elsewhere."""
    if not (
        all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (x_BHTd, cos_BTd, sin_BTd))
        and x_BHTd.dtype in (torch.float32, torch.bfloat16)
        and cos_BTd.dtype == sin_BTd.dtype
        and cos_BTd.dtype in (torch.float32, torch.bfloat16)
        and x_BHTd.dim() == 4
        and cos_BTd.shape == sin_BTd.shape == (x_BHTd.shape[0], x_BHTd.shape[2], x_BHTd.shape[3])
        and x_BHTd.shape[-1] % 2 == 0
    ):
        return apply_rope(x_BHTd, cos_BTd, sin_BTd)
    x_BTHd = x_BHTd.transpose(1, 2).contiguous()  # a view of the projection's rows: no copy
    return RopeRows.apply(x_BTHd, cos_BTd.contiguous(), sin_BTd.contiguous()).transpose(1, 2)


class RopeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTHd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos_BTd, sin_BTd)
        return cpu_kernels.rope_rows(x_BTHd, cos_BTd, sin_BTd, inverse=False)

    @staticmethod
    def backward(ctx, dout_BTHd: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        cos_BTd, sin_BTd = ctx.saved_tensors
        return cpu_kernels.rope_rows(dout_BTHd.contiguous(), cos_BTd, sin_BTd, inverse=True), None, None


def causal_attention(
    q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, layer_id: int
) -> torch.Tensor:
    """Causal attention (an AttentionBackend): the kernel where it applies, else causal_sdpa."""
    dtype = _compute_dtype(q_BHTd, k_BGTd, v_BGTd)
    H, d = q_BHTd.shape[1], q_BHTd.shape[-1]
    if not (
        dtype in (torch.bfloat16, torch.float32)
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (q_BHTd, k_BGTd, v_BGTd))
        and d % 16 == 0
        and d <= MAX_HEAD_DIM
        and H % k_BGTd.shape[1] == 0
    ):
        return causal_sdpa(q_BHTd, k_BGTd, v_BGTd, layer_id)
    # Rows [B, T, heads, d]: the projections' own layout, so these are views unless rope copied.
    q, k, v = (t.to(dtype).transpose(1, 2).contiguous() for t in (q_BHTd, k_BGTd, v_BGTd))
    return CausalAttention.apply(q, k, v, d**-0.5).transpose(1, 2)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype SDPA would compute in: CPU autocast's where it is on (it casts SDPA's inputs),
    else the inputs' common one (None where they differ)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else None


class CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q_BTHd: torch.Tensor, k_BTGd: torch.Tensor, v_BTGd: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out_BTHd, lse_BTH = cpu_kernels.attention_train_forward(q_BTHd, k_BTGd, v_BTGd, scale)
        ctx.save_for_backward(q_BTHd, k_BTGd, v_BTGd, out_BTHd, lse_BTH)
        ctx.scale = scale
        return out_BTHd

    @staticmethod
    def backward(ctx, dout_BTHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cpu_kernels.attention_train_backward(
            q, k, v, out, dout_BTHd.to(q.dtype).contiguous(), lse, ctx.scale
        )
        return dq, dk, dv, None
