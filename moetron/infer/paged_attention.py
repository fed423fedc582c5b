"""Attention over the paged KV cache: the model's `attention_backend` during an engine step.

The model calls the backend once per layer with the packed step ([1, T] tokens of many sequences)
and the layer's index. For that layer's cache it writes the new keys/values into their cache slots, then each
sequence's queries attend over that sequence's cached keys, causally offset by what was cached
before this step.

With moetron's CPU kernels (fp32 on an AVX2 CPU), rows attend through `paged_attention_f32`
(moetron/kernels/attention_avx2.cpp), which reads keys straight from the cache blocks and computes
each query row on its own: batch-invariant by construction. Batch-invariant mode sends every row
there; the other mode only decodes and later prefill chunks, and whole prompts go to SDPA.

Without those kernels, batch-invariant mode computes every query row the same way whatever the chunking: query rows padded
to a multiple of ROW_GRANULE (MKL's choice of kernel depends on the row count), keys padded with
masked zeros to a multiple of KEY_TILE, and the value product done per KEY_TILE-key slice and summed
over slices (a single product's summation order depended on the key count), so a row's result does
not depend on how many queries share its tile or how far the padded key range reaches. Measured bit-identical
for a query computed in any chunk of any prefill or as a decode (tests/test_infer_determinism.py).
The other mode uses SDPA for whole prompts and decodes.

Legend: T packed tokens of the step, H query heads, G kv heads, r = H / G, d head_dim,
n a sequence's new tokens this step, c its context length (cached + new), C padded key count,
M query rows of one kv head (queries × r), N blocks, S block size, X key tiles, K keys per tile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetron.infer.batch_invariant import MIN_COLUMNS, pad_rows
from moetron.kernels import cpu_kernels

KEY_TILE = 256  # keys per value-product tile (invariant mode): MKL's sum depends on the key count
QUERY_TILE = 128  # queries per score matrix at most
# ...and fewer at long context, so one score matrix stays under 16 MiB: it bounds memory, and larger
# buffers go to mmap and back on every call (glibc), paying a page fault per 4 KiB on each touch.
MAX_SCORE_ELEMENTS = 2**22


@dataclass
class SeqSlice:
    """One sequence's part of the packed step."""

    start: int  # its first row among the T packed tokens
    num_new: int  # n
    context_len: int  # c: cached tokens after this step's writes
    block_ids: list[int]  # the cache blocks it holds, in order
    device: torch.device

    @functools.cached_property
    def block_table(self) -> torch.Tensor:
        """block_ids as int64 [num blocks held] on the step's device, made on first use: the
        kernel's tables are built from the list, and only the other paths read this."""
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.device)


@dataclass
class KernelTables:
    """What moetron's attention kernel needs for a step's rows: each row's sequence (a row of
    tables_QB, the block tables padded to one width) and position, and the packed rows they are."""

    tables_QB: torch.Tensor
    seq_of_row_T: torch.Tensor
    pos_of_row_T: torch.Tensor
    rows: list[int]
    max_position: int  # the largest of pos_of_row_T

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int) -> KernelTables:
        width = max(len(s.block_ids) for s in seqs)
        tables: list[list[int]] = []
        rows: list[int] = []
        seq_of_row: list[int] = []
        pos_of_row: list[int] = []
        for i, s in enumerate(seqs):
            # The kernel reads the block table up to each row's position: it must be covered.
            if s.context_len > len(s.block_ids) * block_size:
                raise ValueError(f"a sequence of {s.context_len} tokens holds only {len(s.block_ids)} blocks")
            tables.append(s.block_ids + [0] * (width - len(s.block_ids)))
            rows.extend(range(s.start, s.start + s.num_new))
            seq_of_row.extend([i] * s.num_new)
            pos_of_row.extend(range(s.context_len - s.num_new, s.context_len))
        seq_of_row_T, pos_of_row_T = torch.tensor([seq_of_row, pos_of_row])  # one call: two rows
        return cls(torch.tensor(tables), seq_of_row_T, pos_of_row_T, rows, max(pos_of_row))

    def attend(
        self, q_THd: torch.Tensor, k_cache_NSGd: torch.Tensor, v_cache_NSGd: torch.Tensor
    ) -> torch.Tensor:
        return cpu_kernels.paged_attention_f32(
            q_THd, k_cache_NSGd, v_cache_NSGd, self.tables_QB, self.seq_of_row_T, self.pos_of_row_T
        )


class PagedAttention:
    """attention_backend(q_BHTd, k_BGTd, v_BGTd, layer_id) -> out_BHTd for one engine step (all layers).

    The fused decoder layers (fused_layers.py) read its caches, slot mapping and kernel tables
    instead of calling it; `every_row_to_kernel` builds the tables for all rows in both modes. The
    caches may hold a narrower dtype than the queries (bf16 under fp32): values are rounded once as
    they are written and widened where they are read."""

    def __init__(
        self,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        slot_mapping_T: torch.Tensor,
        seqs: list[SeqSlice],
        invariant: bool,
        every_row_to_kernel: bool = False,
        float32_queries: bool = True,
    ) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches  # per layer [N, S, G, d]
        self.slot_mapping_T = slot_mapping_T
        self.invariant = invariant
        # moetron's kernel takes every row, or (non-invariant mode) all but whole prompts, which
        # SDPA does faster. kernel_rows_T: the packed rows it takes when that is not all of them.
        self.kernel_tables: KernelTables | None = None
        self.kernel_rows_T: torch.Tensor | None = None
        cache = k_caches[0]
        # The kernel takes fp32 queries over an fp32 or bf16 cache (engine.kv_cache_dtype).
        kernel_dtypes = float32_queries and cache.dtype in (torch.float32, torch.bfloat16)
        if cache.device.type == "cpu" and kernel_dtypes and cpu_kernels.available():
            to_sdpa = [
                not (invariant or every_row_to_kernel) and s.num_new > 1 and s.context_len == s.num_new
                for s in seqs
            ]
            kernel_seqs = [s for s, sdpa in zip(seqs, to_sdpa, strict=True) if not sdpa]
            seqs = [s for s, sdpa in zip(seqs, to_sdpa, strict=True) if sdpa]
            if kernel_seqs:
                self.kernel_tables = KernelTables.build(kernel_seqs, cache.shape[1])
                if seqs:
                    self.kernel_rows_T = torch.tensor(self.kernel_tables.rows, dtype=torch.long)
        # Single-query sequences (decodes) attend together in one batched call; the rest one by one.
        decodes = [s for s in seqs if s.num_new == 1]
        self.decodes = decodes if len(decodes) > 1 else []
        self.seqs = [s for s in seqs if s.num_new > 1] if self.decodes else seqs
        if self.decodes:
            self._prepare_decodes(k_caches[0].shape[1], slot_mapping_T.device)

    def _prepare_decodes(self, block_size: int, device: torch.device) -> None:
        """Once per step: the decodes' block tables padded to one width, and which keys are theirs."""
        lengths = [s.context_len for s in self.decodes]
        longest = max(lengths)
        self.decode_key_len = _round_up(longest, KEY_TILE) if self.invariant else longest
        num_blocks = -(-self.decode_key_len // block_size)
        table_SX = torch.zeros(len(self.decodes), num_blocks, dtype=torch.long, device=device)
        for i, s in enumerate(self.decodes):  # padding entries point at block 0: read, then masked
            held = s.block_table[:num_blocks]
            table_SX[i, : held.numel()] = held
        self.decode_table_SX = table_SX
        self.decode_rows_S = torch.tensor([s.start for s in self.decodes], device=device)
        lengths_S = torch.tensor(lengths, device=device)
        self.decode_valid_SC = torch.arange(self.decode_key_len, device=device)[None, :] < lengths_S[:, None]

    def __call__(
        self, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor, layer_id: int
    ) -> torch.Tensor:
        k_cache_NSGd, v_cache_NSGd = self.k_caches[layer_id], self.v_caches[layer_id]
        num_kv_heads, head_dim = k_cache_NSGd.shape[-2:]
        for cache, new_BGTd in ((k_cache_NSGd, k_BGTd), (v_cache_NSGd, v_BGTd)):
            cache.view(-1, num_kv_heads, head_dim).index_copy_(
                0, self.slot_mapping_T, new_BGTd[0].transpose(0, 1).to(cache.dtype)
            )
        q_HTd = q_BHTd[0]
        if self.kernel_tables is not None and self.kernel_rows_T is None:
            # Every row of the step through the kernel (the usual case): no gather, no scatter.
            out_THd = self.kernel_tables.attend(q_HTd.transpose(0, 1), k_cache_NSGd, v_cache_NSGd)
            return out_THd.transpose(0, 1)[None]
        out_HTd = torch.empty_like(q_HTd)
        if self.kernel_tables is not None:
            q_THd = q_HTd.transpose(0, 1).index_select(0, self.kernel_rows_T)
            out_HTd[:, self.kernel_rows_T] = self.kernel_tables.attend(
                q_THd, k_cache_NSGd, v_cache_NSGd
            ).transpose(0, 1)
        for seq in self.seqs:
            end = seq.start + seq.num_new
            first_pos = seq.context_len - seq.num_new
            # SDPA for whole prompts and decodes; a later prefill chunk would need an explicit [n, c]
            # mask, which costs more to build than the tiled kernel costs to run.
            tiled = self.invariant or (seq.num_new > 1 and first_pos > 0)
            key_len = _round_up(seq.context_len, KEY_TILE) if tiled else seq.context_len
            k_GCd = gather(k_cache_NSGd, seq.block_table, key_len).to(q_HTd.dtype)
            v_GCd = gather(v_cache_NSGd, seq.block_table, key_len).to(q_HTd.dtype)
            attend = invariant_attention if tiled else sdpa_attention
            out_HTd[:, seq.start : end] = attend(q_HTd[:, seq.start : end], k_GCd, v_GCd, first_pos)
        if self.decodes:
            out_HTd[:, self.decode_rows_S] = self._decode(q_HTd, k_cache_NSGd, v_cache_NSGd).transpose(0, 1)
        return out_HTd[None]

    def _decode(
        self, q_HTd: torch.Tensor, k_cache_NSGd: torch.Tensor, v_cache_NSGd: torch.Tensor
    ) -> torch.Tensor:
        """All single-query sequences at once → out [S, H, d]."""
        num_seqs, key_len = self.decode_table_SX.shape[0], self.decode_key_len
        q_SHd = q_HTd[:, self.decode_rows_S].transpose(0, 1)
        k_SGCd, v_SGCd = (
            cache.index_select(0, self.decode_table_SX.flatten())
            .view(num_seqs, -1, *cache.shape[-2:])[:, :key_len]
            .transpose(1, 2)
            .to(q_HTd.dtype)
            .contiguous()
            for cache in (k_cache_NSGd, v_cache_NSGd)
        )
        if self.invariant:
            return batched_invariant_decode(q_SHd, k_SGCd, v_SGCd, self.decode_valid_SC)
        mask_S11C = self.decode_valid_SC[:, None, None, :]
        out_SH1d = F.scaled_dot_product_attention(
            q_SHd[:, :, None], k_SGCd, v_SGCd, attn_mask=mask_S11C, enable_gqa=True
        )
        return out_SH1d[:, :, 0]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def gather(cache_NSGd: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached rows as [G, length, d] (zeros past its blocks)."""
    blocks_nSGd = cache_NSGd.index_select(0, block_table)
    rows_LGd = blocks_nSGd.flatten(0, 1)
    if rows_LGd.shape[0] >= length:
        rows_LGd = rows_LGd[:length]
    else:
        rows_LGd = F.pad(rows_LGd, (0, 0, 0, 0, 0, length - rows_LGd.shape[0]))
    return rows_LGd.transpose(0, 1).contiguous()


def sdpa_attention(
    q_Hnd: torch.Tensor, k_Gcd: torch.Tensor, v_Gcd: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """A whole prompt (first_pos 0, causal) or decodes (one query over all c keys)."""
    num_new = q_Hnd.shape[1]
    if num_new > 1 and first_pos > 0:
        raise ValueError("sdpa_attention takes whole prompts and single decode queries")
    out = F.scaled_dot_product_attention(
        q_Hnd[None], k_Gcd[None], v_Gcd[None], is_causal=num_new > 1, enable_gqa=True
    )
    return out[0]


def invariant_attention(
    q_Hnd: torch.Tensor, k_GCd: torch.Tensor, v_GCd: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """Like sdpa_attention, with every query row computed by the same kernels over the same shapes
    whatever n, first_pos or C (keys past a row's position are masked and contribute exact zeros)."""
    num_heads, num_new, head_dim = q_Hnd.shape
    num_kv_heads = k_GCd.shape[0]
    r = num_heads // num_kv_heads
    dtype = q_Hnd.dtype
    # Rows of one kv head ordered (query, head in group): GQA without repeating keys. The softmax
    # scale goes on q (small) rather than on the [M, C] scores.
    scale = 1.0 / math.sqrt(head_dim)
    q_GMd = (
        (q_Hnd.float() * scale)
        .view(num_kv_heads, r, num_new, head_dim)
        .transpose(1, 2)
        .reshape(num_kv_heads, -1, head_dim)
    )
    k_GCd, v_GCd = k_GCd.float(), v_GCd.float()
    if head_dim % MIN_COLUMNS:  # narrow heads: MKL's value product then depends on a row's place
        v_GCd = F.pad(v_GCd, (0, _round_up(head_dim, MIN_COLUMNS) - head_dim))
    out_GMd = q_GMd.new_empty(num_kv_heads, num_new * r, v_GCd.shape[-1])
    tile = max(1, min(QUERY_TILE, MAX_SCORE_ELEMENTS // (num_kv_heads * r * (first_pos + num_new))))
    for tile_start in range(0, num_new, tile):
        tile_end = min(num_new, tile_start + tile)
        rows = (tile_end - tile_start) * r
        key_len = _round_up(first_pos + tile_end, KEY_TILE)
        num_key_tiles = key_len // KEY_TILE
        tile_GMd = pad_rows(q_GMd[:, tile_start * r : tile_end * r])
        padded_rows = tile_GMd.shape[1]
        scores_GMC = tile_GMd @ k_GCd[:, :key_len].transpose(1, 2)
        # Causal mask: only keys from the tile's first position on can be in any row's future.
        first_masked = first_pos + tile_start + 1
        positions_M = first_pos + tile_start + torch.arange(padded_rows, device=q_Hnd.device) // r
        positions_M = positions_M.clamp_(max=first_pos + tile_end - 1)  # padding rows: any valid position
        keys_C = torch.arange(first_masked, key_len, device=q_Hnd.device)
        scores_GMC[:, :, first_masked:].masked_fill_(keys_C[None, :] > positions_M[:, None], float("-inf"))
        probs_GMC = scores_GMC.softmax(dim=-1)
        # The value product over fixed KEY_TILE-key slices, summed across slices: one product over
        # all C keys would let MKL block the sum by C, so a row's bits would depend on the context
        # padding; slices past a row's position hold exact zeros and change nothing.
        probs_GXMK = probs_GMC.view(num_kv_heads, padded_rows, num_key_tiles, KEY_TILE).transpose(1, 2)
        values_GXKd = v_GCd[:, :key_len].reshape(num_kv_heads, num_key_tiles, KEY_TILE, -1)
        out_GMd[:, tile_start * r : tile_end * r] = (probs_GXMK @ values_GXKd).sum(dim=1)[:, :rows]
    out_GMd = out_GMd[..., :head_dim]
    return out_GMd.reshape(num_kv_heads, num_new, r, head_dim).transpose(1, 2).reshape(q_Hnd.shape).to(dtype)


def batched_invariant_decode(
    q_SHd: torch.Tensor, k_SGCd: torch.Tensor, v_SGCd: torch.Tensor, valid_SC: torch.Tensor
) -> torch.Tensor:
    """invariant_attention for S single queries at once (one batched product per step and layer):
    the same padded shapes per (sequence, kv head) item, so the same bits as attending alone."""
    num_seqs, num_heads, head_dim = q_SHd.shape
    num_kv_heads, key_len = k_SGCd.shape[1], k_SGCd.shape[2]
    r = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    q_BMd = pad_rows((q_SHd.float() * scale).reshape(num_seqs * num_kv_heads, r, head_dim))
    k_BCd = k_SGCd.float().reshape(num_seqs * num_kv_heads, key_len, head_dim)
    v_BCd = v_SGCd.float().reshape(num_seqs * num_kv_heads, key_len, head_dim)
    if head_dim % MIN_COLUMNS:
        v_BCd = F.pad(v_BCd, (0, _round_up(head_dim, MIN_COLUMNS) - head_dim))
    scores_BMC = q_BMd @ k_BCd.transpose(1, 2)
    invalid_B1C = ~valid_SC.repeat_interleave(num_kv_heads, dim=0)[:, None, :]
    probs_BMC = scores_BMC.masked_fill_(invalid_B1C, float("-inf")).softmax(dim=-1)
    num_batch, padded_rows, num_tiles = probs_BMC.shape[0], probs_BMC.shape[1], key_len // KEY_TILE
    probs_BXMK = probs_BMC.view(num_batch, padded_rows, num_tiles, KEY_TILE).transpose(1, 2)
    values_BXKd = v_BCd.view(num_batch, num_tiles, KEY_TILE, -1)
    out_BMd = (probs_BXMK @ values_BXKd).sum(dim=1)
    return out_BMd[:, :r, :head_dim].reshape(num_seqs, num_heads, head_dim).to(q_SHd.dtype)
