"""Tensor parallelism for the serving engine's attention: each of T ranks holds H / T query heads
and G / T key/value heads of every layer (their rows of wq, wk, wv) and the KV cache of those heads.

A layer's attention on a tensor-parallel rank: rmsnorm, its heads' q/k/v, RoPE, its cache, its
heads' attention (moetron_attention_heads); an all-gather of every rank's heads in head order;
then the whole output projection and the residual (moetron_attention_output). The output
projection is not split: a row-parallel wo would sum T partial dot products, which rounds
differently from one process's single chain, so each rank keeps all of wo and the bits stay those
of one process. What TP buys here is the q/k/v weights and the KV cache divided by T, and each
request's attention computed by T ranks.

The T ranks of a data-parallel group run the same engine over the same requests (rank 0 sends each
request to all of them, unseeded sampling given a seed): their schedules, caches and samples stay
in lockstep by determinism, and only the group's first rank reports outputs. Needs G % T == 0, so
one KV head (multi-query attention) cannot be split (data_parallel.check_layout says so).

Legend: T tokens, D width, H / G query / kv heads of the model, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moetron.model.transformer import Transformer

# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.6 has only the old ones.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class HeadParallel:
    """This rank's place in its tensor-parallel group (the ranks sharing its requests)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def gather_heads(self, heads_TX: torch.Tensor) -> torch.Tensor:
        """Every rank's heads [T, X] (X = its H/size heads · d) → [T, size·X] in head order."""
        num_tokens, width = heads_TX.shape
        gathered = torch.empty(self.size * num_tokens, width)
        all_gather(gathered, heads_TX, group=self.group)
        return (
            gathered.view(self.size, num_tokens, width).transpose(0, 1).reshape(num_tokens, self.size * width)
        )


def shard_attention(model: Transformer, heads: HeadParallel) -> None:
    """Keep this rank's rows of every layer's wq / wk / wv (its heads) and set the layers' head
    counts to the local ones; wo stays whole (module doc)."""
    for layer in model.layers:
        attention = layer.attention
        num_heads, num_kv_heads = attention.num_heads // heads.size, attention.num_kv_heads // heads.size
        d = attention.head_dim
        for linear, count in (
            (attention.wq, num_heads),
            (attention.wk, num_kv_heads),
            (attention.wv, num_kv_heads),
        ):
            rows = slice(heads.rank * count * d, (heads.rank + 1) * count * d)
            linear.weight = nn.Parameter(linear.weight.data[rows].clone(), requires_grad=False)
        attention.num_heads, attention.num_kv_heads = num_heads, num_kv_heads
