"""moetron's "r8" layout of Q8_0 / Q4_0 weights: the blocks of each 8 rows interleaved so that one
32-byte load holds 4 values of each of the 8 rows (moetron/kernels/quant_tiles.h computes 8 output
rows as the 8 lanes of a vector). The same bytes as GGML's layout, reordered within each group of 8
rows: a weight [R, B * block_bytes] keeps its shape, R a multiple of 8.

Per group of 8 rows and block b (Q8_0: 272 bytes; Q4_0: 144):
  the 8 rows' fp16 scales, then their values in 4-byte groups g: row r's values 4g..4g+3 at
  bytes 32g + 4r (Q8_0, g < 8); for Q4_0 (g < 4) byte 32g + 4r + j holds value 4g + j in its low
  nibble and value 16 + 4g + j in its high nibble, as a GGML Q4_0 byte pairs j and j + 16.

Legend: R rows (G = R / 8 groups), B blocks per row, L values per block (32).
"""

from __future__ import annotations

import torch

from moetron.quant.ggml_blocks import block_format

INTERLEAVED = {"q8_0": "q8_0_r8", "q4_0": "q4_0_r8"}
ROWS = 8


def base_format(fmt: str) -> str:
    """The GGML format whose blocks an r8 format holds (itself for the others)."""
    return fmt.removesuffix("_r8")


def _grouped(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    rows, width = data_RY.shape
    block = block_format(fmt).block_bytes
    if data_RY.dtype != torch.uint8 or rows % ROWS or width % block:
        raise ValueError(
            f"the r8 layout takes uint8 {fmt} rows in groups of {ROWS}, got {data_RY.dtype} {list(data_RY.shape)}"
        )
    return data_RY.reshape(rows // ROWS, ROWS, width // block, block)  # [G, 8, B, Y]


def to_r8(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGML-layout blocks [R, B * Y] → the same blocks interleaved by 8 rows (same shape)."""
    blocks_G8BY = _grouped(data_RY, fmt)
    scales_GB8Z = blocks_G8BY[..., :2].permute(0, 2, 1, 3)  # Z = 2 bytes of an fp16 scale
    values_G8BV = blocks_G8BY[..., 2:]
    groups = values_G8BV.shape[-1] // 4
    # [G, 8, B, g, 4] -> [G, B, g, 8, 4]: group g of every row together
    values_GBg84 = values_G8BV.reshape(*values_G8BV.shape[:3], groups, 4).permute(0, 2, 3, 1, 4)
    out = torch.cat(
        [scales_GB8Z.reshape(*scales_GB8Z.shape[:2], -1), values_GBg84.reshape(*values_GBg84.shape[:2], -1)],
        dim=2,
    )
    return out.reshape(data_RY.shape).contiguous()


def from_r8(data_RY: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of to_r8: GGML's layout back."""
    rows, width = data_RY.shape
    block = block_format(fmt).block_bytes
    num_blocks, groups = width // block, (block - 2) // 4
    _grouped(data_RY, fmt)  # the checks
    interleaved_GBY = data_RY.reshape(rows // ROWS, num_blocks, ROWS * block)
    scales_GB8Z = interleaved_GBY[..., : 2 * ROWS].reshape(rows // ROWS, num_blocks, ROWS, 2)
    values_GBg84 = interleaved_GBY[..., 2 * ROWS :].reshape(rows // ROWS, num_blocks, groups, ROWS, 4)
    values_G8BV = values_GBg84.permute(0, 3, 1, 2, 4).reshape(rows // ROWS, ROWS, num_blocks, groups * 4)
    blocks_G8BY = torch.cat([scales_GB8Z.permute(0, 2, 1, 3), values_G8BV], dim=3)
    return blocks_G8BY.reshape(rows, width).contiguous()
