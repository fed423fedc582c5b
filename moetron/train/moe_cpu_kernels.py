"""moetron's CPU kernels for MoE training (kernels/moe_train_avx2.cpp), installed on a model's MoE
layers from outside (`install`), as the serving engine installs its own:

  * `KernelMoves`: the routed-experts node's row plan (a counting sort, for torch's argsort and
    five map-building ops) and its four row moves, one pass each that gathers, converts and weighs
    (for 3-5 whole-tensor torch ops each): torch's bits, but for the router weights' gradient, a
    dot product summed in the kernel's own order (model/routed_swiglu_cpu.py has the torch ones);
  * `KernelMoves.matmuls`: the experts' fp32 products, each expert's on one thread and the
    experts spread over the threads (kernels/grouped_sgemm.cpp), where torch splits every product
    over all of them: torch.mm's bits at one thread (its multi-threaded bits can differ at tiny
    shapes), so the result does not depend on the thread count or the schedule either;
  * `topk_routing`: the router's top-k choice and its weights as one autograd node, a kernel each
    way. torch's top-k over [T, E] probabilities, the gather of the chosen ones, their
    renormalisation and the backward of each (a scatter into zeros, two reductions) took ~0.6 ms a
    layer at the demo's 4,096 tokens x 16 experts; the kernels take a few dozen microseconds. The
    weights are torch's bits; ties in the biased scores go to the lower expert (torch.topk's choice
    among equal values is unspecified).

Measured at the demo's shape (bf16, 2-core EPYC): a MoE layer's forward+backward 16.7 -> 12.5 ms
with the routed node (7.7 for the dense FFN it replaces).
"""

from __future__ import annotations

import torch
from torch import nn

from moetron.kernels import cpu_kernels
from moetron.model.grouped_swiglu_cpu import Product, torch_matmuls
from moetron.model.moe import MoELayer
from moetron.model.routed_swiglu_cpu import Layout

# How much longer than an even split the busiest thread's share of the experts' products may be
# for `spread_over_threads` to take them whole, one expert to a thread: a single-threaded product
# of an expert's rows runs 10-30% faster than the same product split over both cores (2-core AVX2
# EPYC, grouped_sgemm.cpp), so a tenth's imbalance still gains.
MAX_IMBALANCE = 1.1


def install(model: nn.Module) -> bool:
    """Give every MoE layer of `model` the kernels where this machine has them (True), else leave
    the torch ops (False). The layers use them only where they apply (plain fp32 CPU tensors)."""
    if not cpu_kernels.available():
        return False
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.row_moves = KernelMoves
            layer.router.select_topk = topk_routing
    return True


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


class KernelMoves:
    """The four moves as one pass each (kernels/moe_train_avx2.cpp), for fp32 or bf16 token rows and
    fp32 router weights. fp32 rows: torch's bits, but for the router weights' gradient, a dot product
    summed in the kernel's own order. bf16 rows (bf16 weights, no autocast): the weighted sums in
    fp32, rounded once (torch rounds each product to bf16 first)."""

    @staticmethod
    def takes(x_TD: torch.Tensor, weights_TK: torch.Tensor) -> bool:
        return (
            x_TD.dtype in (torch.float32, torch.bfloat16)
            and weights_TK.dtype == torch.float32
            and x_TD.is_contiguous()
            and weights_TK.is_contiguous()
            and cpu_kernels.available()
        )

    @staticmethod
    def matmuls(groups: list[list[Product]]) -> None:
        """Each group (an expert's products) whole on one thread, where the groups share the threads
        evenly enough (`spread_over_threads`) and are fp32 matrices; else torch's matmuls."""
        threads = torch.get_num_threads()
        if threads > 1 and cpu_kernels.grouped_sgemm_available():
            costs = [sum(out.numel() * a.shape[-1] for a, _, out, _ in group) for group in groups]
            thread_of = spread_over_threads(costs, threads)
            if thread_of is not None and cpu_kernels.grouped_sgemm(groups, thread_of):
                return
        torch_matmuls(groups)

    @staticmethod
    def plan(
        expert_ids_TK: torch.Tensor, sizes: list[int], padded: list[int], capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A counting sort (for torch's argsort and five map-building ops)."""
        return cpu_kernels.moe_plan_rows(expert_ids_TK.contiguous(), padded, capacity, capacity is not None)

    @staticmethod
    def dispatch(
        x_TD: torch.Tensor, pair_S: torch.Tensor, top_k: int, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        return cpu_kernels.moe_dispatch_rows(x_TD, pair_S, top_k, dtype)

    @staticmethod
    def combine(
        y_SD: torch.Tensor, slot_P: torch.Tensor, weights_TK: torch.Tensor, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        return cpu_kernels.moe_gather_sum_rows(y_SD, slot_P, weights_TK, weights_TK.shape[1], dtype)

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
        return cpu_kernels.moe_combine_backward(dout_TD, weights_TK, y_SD, slot_P, pair_S, weights_grad)

    @staticmethod
    def dispatch_backward(
        dx_SD: torch.Tensor, slot_P: torch.Tensor, top_k: int, dtype: torch.dtype, layout: Layout
    ) -> torch.Tensor:
        return cpu_kernels.moe_gather_sum_rows(dx_SD, slot_P, None, top_k, dtype)


def spread_over_threads(costs: list[int], threads: int) -> list[int] | None:
    """Each job's thread, the costliest job first to the least loaded thread (the lowest on a tie):
    a function of the costs alone, so a step's schedule is the same on every run. None where the
    busiest thread would carry more than MAX_IMBALANCE times an even share."""
    loads = [0] * threads
    thread_of = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        thread = min(range(threads), key=lambda t: (loads[t], t))
        thread_of[job] = thread
        loads[thread] += costs[job]
    if max(loads) * threads > MAX_IMBALANCE * sum(costs):
        return None
    return thread_of
