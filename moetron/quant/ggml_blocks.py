"""GGML's block quantization formats as torch ops, byte for byte what ggml writes and reads.

Legend: R rows, C columns (the reduction axis of a weight [out, in]), B blocks per row (C / 32;
C / 256 for Q4_K), X blocks in all, K weights per block, Y bytes per block.

A quantized weight is a uint8 tensor [R, B * block_bytes] in GGML's own layout, so a GGUF tensor's
bytes are used as they are and moetron's writer produces what llama.cpp reads:

  Q8_0 (34 bytes per 32 weights): fp16 scale d = max|x| / 127, then 32 int8 q = roundf(x / d);
       x ≈ d * q.
  Q4_0 (18 bytes per 32 weights): fp16 scale d = m / -8 where m is the block's value of largest
       magnitude, then 16 bytes of 4-bit q = min(15, trunc(x / d + 8.5)): weight j < 16 in the low
       nibble of byte j, weight j + 16 in its high nibble; x ≈ d * (q - 8).
  Q6_K (210 bytes per 256 weights; read only: what llama.cpp's Q4_K_M gives some attention-value
       and down projections and the head): 128 bytes of low 4 bits, 64 of high 2 bits, sixteen
       int8 scales (one per 16 weights), fp16 d; x = d * scale[s] * (q - 32).
  Q5_K (176 bytes per 256 weights; read only: llama.cpp's Q4_K_M gives it to an 8-expert MoE's
       attention output projections): Q4_K with a fifth bit per weight, 32 bytes of high bits
       before the 4-bit values (weight 64g + l, l < 32: bit 2g of byte l; 64g + 32 + l: bit
       2g + 1); x = d * scale[s] * q - dmin * min[s], q < 32.
  Q4_K (144 bytes per 256 weights): fp16 d and dmin, 12 bytes packing eight 6-bit scales and
       mins (one per 32 weights), 128 bytes of 4-bit q (each 32-byte chunk holds two sub-blocks:
       low nibbles, then high); x ≈ d * scale[s] * q - dmin * min[s].

The Q8_0 and Q4_0 quantizers follow ggml-quants.c's reference ones (`quantize_row_q8_0_ref`,
`quantize_row_q4_0_ref`): float32 arithmetic, the reciprocal scale taken before the fp16 rounding
of the stored one, round half away from zero. Tests compare them with the `gguf` package's. The
Q4_K quantizer is moetron's own, simpler than llama.cpp's (which searches each sub-block's scale
and min iteratively, optionally against an importance matrix): each sub-block's range [min(x, 0),
max(x)] in 15 steps, the 6-bit scales and mins relative to the block's largest. Its bytes are
valid Q4_K that any reader (llama.cpp, gguf) decodes to the same values; only the choice of
values differs, which the perplexity table in the README measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block_bytes: int  # bytes per block
    block_size: int = BLOCK_SIZE  # weights per block
    writable: bool = True  # quantize() writes it (else dequantize() only reads it)

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block_size


Q8_0 = BlockFormat("q8_0", 2 + BLOCK_SIZE)
Q4_0 = BlockFormat("q4_0", 2 + BLOCK_SIZE // 2)
Q4_K = BlockFormat("q4_k", 2 + 2 + 12 + 128, block_size=256)
Q5_K = BlockFormat("q5_k", 2 + 2 + 12 + 32 + 128, block_size=256, writable=False)
Q6_K = BlockFormat("q6_k", 128 + 64 + 16 + 2, block_size=256, writable=False)
FORMATS = {f.name: f for f in (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)}


def block_format(name: str) -> BlockFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown block format {name!r}; choose one of {', '.join(FORMATS)}") from None


def row_bytes(fmt: BlockFormat | str, width: int) -> int:
    """Bytes of one row of `width` weights in `fmt` (a ValueError if the row is not whole blocks)."""
    fmt = block_format(fmt if isinstance(fmt, str) else fmt.name)
    if width % fmt.block_size:
        raise ValueError(f"{fmt.name} holds rows of a multiple of {fmt.block_size} weights, not {width}")
    return width // fmt.block_size * fmt.block_bytes


def quantize(weight_RC: torch.Tensor, fmt: BlockFormat | str) -> torch.Tensor:
    """A float weight [R, C] (C a multiple of 32) → its GGML blocks, uint8 [R, C / 32 * block_bytes]."""
    fmt = block_format(fmt if isinstance(fmt, str) else fmt.name)  # the canonical instance
    if not fmt.writable:
        raise ValueError(
            f"{fmt.name}: moetron reads this format but does not write it yet; use q8_0, q4_0 or q4_k"
        )
    if fmt is Q4_K:
        return _quantize_q4_k(_blocks(weight_RC, fmt).reshape(-1, 256)).reshape(weight_RC.shape[0], -1)
    blocks_XK = _blocks(weight_RC, fmt)  # X = R * B blocks of K = 32 weights
    quantize_blocks = _quantize_q8_0 if fmt is Q8_0 else _quantize_q4_0
    scale_X, payload_XK = quantize_blocks(blocks_XK)
    scale_bytes_X2 = scale_X.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    rows = weight_RC.shape[0]
    return torch.cat([scale_bytes_X2, payload_XK], dim=1).reshape(rows, -1)


def dequantize(data_RY: torch.Tensor, fmt: BlockFormat | str) -> torch.Tensor:
    """GGML blocks uint8 [R, B * block_bytes] → float32 weight [R, B * 32]."""
    fmt = block_format(fmt if isinstance(fmt, str) else fmt.name)  # the canonical instance
    if data_RY.dtype != torch.uint8 or data_RY.dim() != 2 or data_RY.shape[1] % fmt.block_bytes:
        raise ValueError(
            f"{fmt.name} data must be uint8 [rows, blocks * {fmt.block_bytes}], got "
            f"{data_RY.dtype} {list(data_RY.shape)}"
        )
    rows = data_RY.shape[0]
    blocks_XY = data_RY.reshape(-1, fmt.block_bytes)
    if fmt is Q4_K:
        return _dequantize_q4_k(blocks_XY).reshape(rows, -1)
    if fmt is Q5_K:
        return _dequantize_q5_k(blocks_XY).reshape(rows, -1)
    if fmt is Q6_K:
        return _dequantize_q6_k(blocks_XY).reshape(rows, -1)
    scale_X = blocks_XY[:, :2].contiguous().view(torch.float16).float()  # [X, 1]
    payload_XY = blocks_XY[:, 2:]
    if fmt is Q8_0:
        q_XK = payload_XY.contiguous().view(torch.int8).float()
    else:
        low, high = payload_XY & 0x0F, payload_XY >> 4
        q_XK = torch.cat([low, high], dim=1).float() - 8
    return (q_XK * scale_X).reshape(rows, -1)


def _blocks(weight_RC: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    if weight_RC.dim() != 2 or weight_RC.shape[1] % fmt.block_size:
        raise ValueError(
            f"{fmt.name} quantizes [rows, columns] weights with columns a multiple of {fmt.block_size}; "
            f"got shape {list(weight_RC.shape)}"
        )
    if not weight_RC.is_floating_point():
        raise ValueError(f"{fmt.name} quantizes float weights, got {weight_RC.dtype}")
    return weight_RC.detach().float().reshape(-1, BLOCK_SIZE)


def _reciprocal(scale_X: torch.Tensor) -> torch.Tensor:
    """1 / scale, 0 where the scale is 0 (an all-zero block quantizes to zeros)."""
    return torch.where(scale_X == 0, torch.zeros_like(scale_X), 1 / scale_X)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _quantize_q8_0(blocks_XK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale_X = blocks_XK.abs().amax(dim=1) / 127
    q_XK = _round_half_away(blocks_XK * _reciprocal(scale_X)[:, None]).to(torch.int8)
    return scale_X, q_XK.view(torch.uint8)


def _quantize_q4_0(blocks_XK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The value of largest magnitude, the first one on ties (ggml scans j = 0..31 with `>`).
    index_X1 = blocks_XK.abs().argmax(dim=1, keepdim=True)
    scale_X = blocks_XK.gather(1, index_X1).squeeze(1) / -8
    shifted_XK = blocks_XK * _reciprocal(scale_X)[:, None] + 8.5
    q_XK = shifted_XK.trunc().clamp(0, 15).to(torch.uint8)
    half = BLOCK_SIZE // 2
    return scale_X, q_XK[:, :half] | (q_XK[:, half:] << 4)


def _dequantize_q4_k(blocks_XY: torch.Tensor) -> torch.Tensor:
    return _dequantize_k4(blocks_XY, blocks_XY[:, 16:], None)


def _dequantize_q5_k(blocks_XY: torch.Tensor) -> torch.Tensor:
    return _dequantize_k4(blocks_XY, blocks_XY[:, 48:], blocks_XY[:, 16:48])


def _dequantize_k4(
    blocks_XY: torch.Tensor, values_XV: torch.Tensor, high_XL: torch.Tensor | None
) -> torch.Tensor:
    """Q4_K's (and Q5_K's) d, dmin and packed scales, then 4-bit values (Q5_K: plus a high bit)."""
    d_X1 = blocks_XY[:, 0:2].contiguous().view(torch.float16).float()
    dmin_X1 = blocks_XY[:, 2:4].contiguous().view(torch.float16).float()
    # Twelve bytes, three rows of four: bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits
    # of scales 4-7; bytes 4-7 the same for the mins; bytes 8-11 the low 4 bits of scales 4-7
    # (low nibble) and of mins 4-7 (high nibble).
    packed_X34 = blocks_XY[:, 4:16].reshape(-1, 3, 4)
    low_scales, low_mins, high_X4 = packed_X34.unbind(1)
    scales_X8 = torch.cat([low_scales & 0x3F, (high_X4 & 0x0F) | ((low_scales >> 2) & 0x30)], dim=1)
    mins_X8 = torch.cat([low_mins & 0x3F, (high_X4 >> 4) | ((low_mins >> 2) & 0x30)], dim=1)
    step_X81 = (d_X1 * scales_X8.float()).unsqueeze(-1)
    offset_X81 = (dmin_X1 * mins_X8.float()).unsqueeze(-1)
    chunks_X4L = values_XV.reshape(-1, 4, 32)  # L = 32 bytes: two sub-blocks of 32 weights
    q_X8L = torch.stack([chunks_X4L & 0x0F, chunks_X4L >> 4], dim=2).reshape(-1, 8, 32)
    if high_XL is not None:  # sub-block s takes bit s of each high-bits byte
        q_X8L = q_X8L | torch.stack([((high_XL >> s) & 1) << 4 for s in range(8)], dim=1)
    return (step_X81 * q_X8L.float() - offset_X81).reshape(-1, 256)


def _quantize_q4_k(blocks_X256: torch.Tensor) -> torch.Tensor:
    """256 weights per row → 144 bytes (see the module doc for the choice of scales and mins)."""
    sub_X8K = blocks_X256.reshape(-1, 8, 32)
    low_X8 = sub_X8K.amin(dim=2).clamp(max=0)
    step_X8 = (sub_X8K.amax(dim=2) - low_X8) / 15  # each sub-block's range in 15 steps
    offset_X8 = -low_X8  # >= 0: subtracted, as x = d * scale * q - dmin * min
    d_X1 = (step_X8.amax(dim=1, keepdim=True) / 63).to(torch.float16)
    dmin_X1 = (offset_X8.amax(dim=1, keepdim=True) / 63).to(torch.float16)
    scales_X8 = torch.round(step_X8 * _reciprocal(d_X1.float())).clamp(0, 63).to(torch.uint8)
    mins_X8 = torch.round(offset_X8 * _reciprocal(dmin_X1.float())).clamp(0, 63).to(torch.uint8)
    # The values against the scales as stored (6-bit, fp16), as a reader reconstructs them.
    step_X81 = (d_X1.float() * scales_X8.float()).unsqueeze(-1)
    offset_X81 = (dmin_X1.float() * mins_X8.float()).unsqueeze(-1)
    q_X8K = torch.round((sub_X8K + offset_X81) * _reciprocal(step_X81)).clamp(0, 15).to(torch.uint8)
    # Pack the 6-bit scales and mins (the layout _dequantize_q4_k unpacks).
    low_scales = (scales_X8[:, :4] & 0x3F) | ((scales_X8[:, 4:] >> 4) << 6)
    low_mins = (mins_X8[:, :4] & 0x3F) | ((mins_X8[:, 4:] >> 4) << 6)
    high = (scales_X8[:, 4:] & 0x0F) | ((mins_X8[:, 4:] & 0x0F) << 4)
    q_X4L2 = q_X8K.reshape(-1, 4, 2, 32)  # sub-blocks 2c (low nibbles) and 2c + 1 (high) of chunk c
    nibbles_X4L = q_X4L2[:, :, 0] | (q_X4L2[:, :, 1] << 4)
    return torch.cat(
        [
            d_X1.view(torch.uint8),
            dmin_X1.view(torch.uint8),
            low_scales,
            low_mins,
            high,
            nibbles_X4L.reshape(-1, 128),
        ],
        dim=1,
    )


def _dequantize_q6_k(blocks_XY: torch.Tensor) -> torch.Tensor:
    # Two halves of 128 weights; in each, weight 32k + l (k < 4, l < 32) takes the low (k < 2) or
    # high nibble of low-bits byte l + 32 (k % 2) and bits 2k..2k+1 of high-bits byte l.
    low_X22L = blocks_XY[:, :128].reshape(-1, 2, 2, 32)
    high_X2L = blocks_XY[:, 128:192].reshape(-1, 2, 32)
    scales_X16 = blocks_XY[:, 192:208].contiguous().view(torch.int8).float()
    d_X1 = blocks_XY[:, 208:210].contiguous().view(torch.float16).float()
    low_X24L = torch.stack(
        [low_X22L[:, :, 0] & 0x0F, low_X22L[:, :, 1] & 0x0F, low_X22L[:, :, 0] >> 4, low_X22L[:, :, 1] >> 4],
        dim=2,
    )
    high_X24L = torch.stack([(high_X2L >> (2 * k)) & 3 for k in range(4)], dim=2)
    q_X256 = (low_X24L | (high_X24L << 4)).reshape(-1, 256).float() - 32
    return d_X1 * scales_X16.repeat_interleave(16, dim=1) * q_X256
