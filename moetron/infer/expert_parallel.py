"""Expert parallelism for the serving engine: each rank holds E / W of every MoE layer's experts
(and, with tensor parallelism, some of the attention heads: head_parallel.py).

Attention runs data-parallel (each rank its own requests and paged KV: one KV head cannot be split
by heads, see infer/data_parallel.py); only the routed experts are sharded. A decoder layer on a
rank with T_r tokens of this step:

    attention half            the fused kernel, on the rank's own tokens
    route                     rmsnorm + router + top-k, on the rank's own tokens (moetron_moe_route)
    all-gather                every rank's normalised rows and expert ids, padded to T_max rows
    expert outputs            the rank's experts on the gathered pairs routed to them; every other
                              pair stays -0.0 (moetron_moe_expert_outputs)
    reduce-scatter (sum)      each rank gets back [T_r, K, D]: its pairs' outputs
    combine                   Σ_k weight_k · y_k in k order + residual (moetron_moe_combine)

vLLM's `allgather_reducescatter` exchange; gloo (CPU) has no cheaper all-to-all of uneven rows.

Why the bits equal one process's: routing, each expert row and the combine are the one-process
kernels' own per-row arithmetic. What crosses the wire is each (token, k) pair's expert output y
before the combine, not partial sums: the combine is an FMA chain (w0·y0, then fma(w1, y1, ·)),
so summing w0·y0 and w1·y1 computed on two ranks would round differently. Each pair is computed on
exactly one rank and is -0.0 on all others, and x + (-0.0) == x for every float x (+0.0 and -0.0
included), so the reduction returns each y exactly whatever its order, for any top-k and any W.

Every rank takes part in every layer's exchange of every step, with zero rows when it has nothing
to run (`ExpertExchange.idle`): collectives always line up.

Legend: T tokens of this rank, M = W * T_max gathered rows, K experts per token, D width, I expert
hidden width, E experts of the model, L experts of this rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetron.infer.fused_layers import FusedBlock, fused_kernels
from moetron.infer.head_parallel import HeadParallel, all_gather
from moetron.infer.paged_attention import PagedAttention
from moetron.infer.serving_kernels import ServingKernels
from moetron.kernels import cpu_kernels
from moetron.model.transformer import Block, Transformer

# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.6 has only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ExpertShard:
    """Which experts a rank holds: [first, first + count) of num_experts."""

    rank: int
    world_size: int
    num_experts: int

    @property
    def count(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first(self) -> int:
        return self.rank * self.count

    @property
    def experts(self) -> range:
        return range(self.first, self.first + self.count)


class ExpertExchange:
    """The collectives of one engine's expert-parallel steps, on `group` (every serving rank)."""

    def __init__(self, shard: ExpertShard, group: dist.ProcessGroup | None = None) -> None:
        self.shard, self.group = shard, group
        self.tokens_per_rank: list[int] = [0] * shard.world_size
        self.exchange_seconds_total = 0.0  # time inside the expert exchange's collectives
        self.num_steps = 0

    def begin_step(self, num_tokens: int) -> int:
        """Share this rank's token count for the step; returns the count over all ranks (0: nobody
        runs a forward this step)."""
        mine = torch.tensor([num_tokens], dtype=torch.int64)
        every = torch.empty(self.shard.world_size, dtype=torch.int64)
        all_gather(every, mine, group=self.group)
        self.tokens_per_rank = every.tolist()
        total = sum(self.tokens_per_rank)
        if total:
            self.num_steps += 1
        return total

    def expert_outputs(
        self, xn_TD: torch.Tensor, expert_ids_TK: torch.Tensor, block: ShardedBlock
    ) -> torch.Tensor:
        """The outputs [T, K, D] of this rank's tokens' chosen experts, wherever they are held."""
        num_tokens, dim = xn_TD.shape
        top_k = expert_ids_TK.shape[1]
        world, max_tokens = self.shard.world_size, max(self.tokens_per_rank)
        send_TX = torch.zeros(max_tokens, dim + top_k)  # X = D + K: a row and its expert ids (exact in fp32)
        send_TX[:num_tokens, :dim] = xn_TD
        send_TX[:num_tokens, dim:] = expert_ids_TK
        send_TX[num_tokens:, dim:] = -1  # padding rows: no expert anywhere
        start = time.perf_counter()
        gathered_MX = torch.empty(world * max_tokens, dim + top_k)
        all_gather(gathered_MX, send_TX, group=self.group)
        self.exchange_seconds_total += time.perf_counter() - start
        x_MD = gathered_MX[:, :dim].contiguous()
        ids_MK = gathered_MX[:, dim:].to(torch.int64)
        y_MKD = torch.full((world * max_tokens, top_k, dim), -0.0)
        block.local_expert_outputs(x_MD, ids_MK, y_MKD)
        start = time.perf_counter()
        mine_TKD = torch.empty(max_tokens, top_k, dim)
        _reduce_scatter(mine_TKD, y_MKD, group=self.group)
        self.exchange_seconds_total += time.perf_counter() - start
        return mine_TKD[:num_tokens]

    def idle(self, model: Transformer) -> None:
        """This rank has nothing to run: take part in the step's exchanges with zero rows, if any
        other rank runs one."""
        if self.begin_step(0) == 0:
            return
        for layer in model.layers:
            assert isinstance(layer, ShardedBlock)
            layer.moe_half(torch.empty(0, model.cfg.dim))


class ShardedBlock(FusedBlock):
    """FusedBlock on a rank holding a shard of the layer. With `exchange` (expert parallelism) its MoE
    half routes locally, runs the rank's experts on every rank's rows, and combines its own tokens'
    outputs (module doc); with `heads` (tensor parallelism) its attention half computes the rank's
    heads and gathers the others' before the output projection (head_parallel.py). Both set at
    install; either may be None (that half is FusedBlock's)."""

    exchange: ExpertExchange | None
    heads: HeadParallel | None

    def forward(self, x_BTD, cos_BTd, sin_BTd, attention_backend):  # type: ignore[override]
        tables = getattr(attention_backend, "kernel_tables", None)
        if tables is None or attention_backend.kernel_rows_T is not None or x_BTD.shape[0] != 1:
            raise RuntimeError(
                "an expert-parallel model holds a shard of its experts: only engine steps run it"
            )
        return super().forward(x_BTD, cos_BTd, sin_BTd, attention_backend)

    def attention_half(
        self,
        h_TD: torch.Tensor,
        cos_BTd: torch.Tensor,
        sin_BTd: torch.Tensor,
        attention_backend: PagedAttention,
    ) -> None:
        if self.heads is None:
            return super().attention_half(h_TD, cos_BTd, sin_BTd, attention_backend)
        num_tokens, dim = h_TD.shape
        num_heads, num_kv_heads, head_dim, scale = self.attention_constants
        attn_norm, wq, wk, wv, wo = (t.data_ptr() for t in self.attention_tensors)
        q_format, k_format, v_format, o_format = self.attention_formats
        (k_cache, v_cache, cache_format, slots, tables, max_blocks, seq_of_row, pos_of_row,
         block_size) = self.paged_cache_arguments(attention_backend)  # fmt: skip
        heads_TX = torch.empty(num_tokens, num_heads * head_dim)
        lib = cpu_kernels.library()
        lib.moetron_attention_heads(
            h_TD.data_ptr(), attn_norm, self.attention_norm.eps, wq, q_format, wk, k_format, wv, v_format,
            cos_BTd.data_ptr(), sin_BTd.data_ptr(), k_cache, v_cache, cache_format, slots, tables, max_blocks,
            seq_of_row, pos_of_row, heads_TX.data_ptr(), num_tokens, dim, num_heads, num_kv_heads, head_dim,
            block_size, scale, torch.get_num_threads(),
        )  # fmt: skip
        all_heads = self.heads.gather_heads(heads_TX)
        lib.moetron_attention_output(
            h_TD.data_ptr(),
            all_heads.data_ptr(),
            wo,
            o_format,
            num_tokens,
            dim,
            all_heads.shape[1],
            torch.get_num_threads(),
        )

    def moe_half(self, h_TD: torch.Tensor) -> None:
        if self.exchange is None:
            return super().moe_half(h_TD)
        lib = cpu_kernels.library()
        num_tokens, dim = h_TD.shape
        top_k, normalize, _, num_experts = self.routed_constants
        ffn_norm, gate, bias = (t.data_ptr() for t in self.routed_tensors[:3])
        xn_TD = torch.empty(num_tokens, dim)
        ids_TK = torch.empty(num_tokens, top_k, dtype=torch.int64)
        weights_TK = torch.empty(num_tokens, top_k)
        if num_tokens:
            lib.moetron_moe_route(
                h_TD.data_ptr(), ffn_norm, self.ffn_norm.eps, gate, self.routed_formats[0], bias, top_k,
                normalize, xn_TD.data_ptr(), ids_TK.data_ptr(), weights_TK.data_ptr(),
                self.expert_counts().data_ptr(), num_tokens, dim, num_experts, torch.get_num_threads(),
            )  # fmt: skip
        y_TKD = self.exchange.expert_outputs(xn_TD, ids_TK, self)
        if num_tokens:
            lib.moetron_moe_combine(
                h_TD.data_ptr(), y_TKD.data_ptr(), weights_TK.data_ptr(), num_tokens, top_k, dim
            )

    def local_expert_outputs(self, x_MD: torch.Tensor, ids_MK: torch.Tensor, out_MKD: torch.Tensor) -> None:
        """out[m, k] = expert ids[m, k] (x[m]) for the pairs routed to this rank's experts."""
        num_rows, dim = x_MD.shape
        if num_rows == 0:
            return
        _, _, hidden, _ = self.routed_constants
        w1, w3, w2 = (t.data_ptr() for t in self.routed_tensors[3:])
        w1_format, w3_format, w2_format = self.routed_formats[1:]
        cpu_kernels.library().moetron_moe_expert_outputs(
            x_MD.data_ptr(), ids_MK.data_ptr(), self.exchange.shard.first, w1, w1_format, w3, w3_format, w2,
            w2_format, out_MKD.data_ptr(), num_rows, ids_MK.shape[1], dim, hidden, self.exchange.shard.count,
            torch.get_num_threads(),
        )  # fmt: skip


def sharded_kernels(
    model: Transformer, base: ServingKernels, exchange: ExpertExchange | None, heads: HeadParallel | None
) -> ServingKernels:
    """`base` (the batch mode's kernels) fused, with every decoder layer a ShardedBlock."""
    fused = fused_kernels(model, base)

    def prepare(model_: torch.nn.Module, module: torch.nn.Module) -> None:
        if isinstance(module, ShardedBlock):
            module.exchange, module.heads = exchange, heads
        if fused.prepare is not None:
            fused.prepare(model_, module)

    return ServingKernels(f"{fused.name}+sharded", {**fused.classes, Block: ShardedBlock}, prepare=prepare)
