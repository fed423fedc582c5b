"""moetron's "r8" layout of Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K weights: the blocks of each 8 rows interleaved
so that one 32-byte load holds 4 values of each of the 8 rows (moetron/kernels/quant_tiles.h computes
8 output rows as the 8 lanes of a vector). The same bytes as GGML's layout, reordered within each
group of 8 rows: a weight [R, B * block_bytes] keeps its shape, R a multiple of 8.

Per group of 8 rows and block b: each header field of the 8 rows together (Q8_0 / Q4_0: the fp16
scales; Q4_K: the 8 d, then the 8 dmin; Q6_K: the 8 d, which end its blocks), then the rest of the
block in 4-byte groups: the k-th 4 bytes of every row, row after row (32k + 4r for row r). For Q4_K
the rest starts with its 12 bytes of packed scales (Q5_K: then its 32 bytes of high bits); for Q6_K it is its low bits, high bits and 16
scales in their order. A 4-byte group holds 4 consecutive Q8_0 values; for Q4_0 (and Q4_K) its low
nibbles are 4 values and its high nibbles the 4 that GGML pairs with them (16 on in Q4_0, 32 on in
Q4_K's 64-value chunks).

Legend: R rows (G = R / 8 groups), B blocks per row, Y bytes per block, V value bytes per block.
"""

from __future__ import annotations

import torch

from moetron.quant.ggml_blocks import block_format

INTERLEAVED = {"q8_0": "q8_0_r8", "q4_0": "q4_0_r8", "q4_k": "q4_k_r8", "q5_k": "q5_k_r8", "q6_k": "q6_k_r8"}
ROWS = 8
# Each format's header fields as (start, stop) bytes of a block; the other bytes are its values.
# (Q4_K's 12 bytes of packed scales and Q6_K's 16 scales count as values: more 4-byte groups, which
# the kernels read for 8 rows at once, lane by lane.)
_HEADER = {
    "q8_0": ((0, 2),),
    "q4_0": ((0, 2),),
    "q4_k": ((0, 2), (2, 4)),
    "q5_k": ((0, 2), (2, 4)),
    "q6_k": ((208, 210),),
}


def _values(fmt: str) -> torch.Tensor:
    """The byte offsets of a block's values (every byte outside its header fields), in order."""
    block = block_format(fmt).block_bytes
    keep = torch.ones(block, dtype=torch.bool)
    for a, b in _HEADER[fmt]:
        keep[a:b] = False
    return keep.nonzero().squeeze(1)


def base_format(fmt: str) -> str:
    """The GGML format whose blocks an r8 format holds (itself for the others)."""
    return fmt.removesuffix("_r8")


def _grouped(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    rows, width = data_RY.shape
    block = block_format(fmt).block_bytes
    if fmt not in _HEADER or data_RY.dtype != torch.uint8 or rows % ROWS or width % block:
        raise ValueError(
            f"the r8 layout takes uint8 q8_0/q4_0/q4_k/q5_k/q6_k rows in groups of {ROWS}, got {fmt} "
            f"{data_RY.dtype} {list(data_RY.shape)}"
        )
    return data_RY.reshape(rows // ROWS, ROWS, width // block, block)  # [G, 8, B, Y]


def to_r8(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGML-layout blocks [R, B * Y] → the same blocks interleaved by 8 rows (same shape)."""
    blocks_G8BY = _grouped(data_RY, fmt)
    num_groups, _, num_blocks, _ = blocks_G8BY.shape
    parts = [
        blocks_G8BY[..., a:b].permute(0, 2, 1, 3).reshape(num_groups, num_blocks, -1) for a, b in _HEADER[fmt]
    ]
    values_G8BV = blocks_G8BY[..., _values(fmt)]
    chunks = values_G8BV.shape[-1] // 4
    # [G, 8, B, k, 4] -> [G, B, k, 8, 4]: the k-th 4 bytes of every row together
    values_GBk84 = values_G8BV.reshape(num_groups, ROWS, num_blocks, chunks, 4).permute(0, 2, 3, 1, 4)
    parts.append(values_GBk84.reshape(num_groups, num_blocks, -1))
    return torch.cat(parts, dim=2).reshape(data_RY.shape).contiguous()


def from_r8(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of to_r8: GGML's layout back."""
    blocks_G8BY = _grouped(data_RY, fmt)  # the checks; the bytes are read below as interleaved
    num_groups, _, num_blocks, block = blocks_G8BY.shape
    interleaved_GBX = data_RY.reshape(num_groups, num_blocks, ROWS * block)
    fields, offset = [], 0
    for a, b in _HEADER[fmt]:
        size = ROWS * (b - a)
        fields.append(
            interleaved_GBX[..., offset : offset + size].reshape(num_groups, num_blocks, ROWS, b - a)
        )
        offset += size
    values = _values(fmt)
    chunks = values.numel() // 4
    values_GBk84 = interleaved_GBX[..., offset:].reshape(num_groups, num_blocks, chunks, ROWS, 4)
    blocks_GB8Y = torch.empty(num_groups, num_blocks, ROWS, block, dtype=torch.uint8)
    blocks_GB8Y[..., values] = values_GBk84.permute(0, 1, 3, 2, 4).reshape(num_groups, num_blocks, ROWS, -1)
    for (a, b), field in zip(_HEADER[fmt], fields, strict=True):
        blocks_GB8Y[..., a:b] = field
    return blocks_GB8Y.permute(0, 2, 1, 3).reshape(data_RY.shape).contiguous()
