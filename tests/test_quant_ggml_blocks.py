"""GGML block formats (moetron/quant/ggml_blocks.py) against the `gguf` package's reference
quantizers and dequantizers (bit-exact ports of ggml-quants.c): identical bytes, identical floats."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from moetron.quant import ggml_blocks
from moetron.quant.ggml_blocks import Q4_0, Q4_K, Q8_0, dequantize, quantize

GGML_TYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
    "q5_k": gguf.GGMLQuantizationType.Q5_K,
    "q6_k": gguf.GGMLQuantizationType.Q6_K,
}


def _weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(24, 256, generator=gen) * 0.05
    heavy = torch.randn(8, 128, generator=gen) ** 3  # outliers: scales far apart between blocks
    edge = torch.zeros(6, 64)
    edge[1, :32] = 1.0  # one constant block
    edge[2, 5] = -3.0  # a single negative maximum
    edge[3, :] = torch.linspace(-1, 1, 64)
    edge[4, :32] = torch.tensor([0.5, -0.5] * 16)  # ties in |x|: the first one is the block's max
    # scale 127 / 127 = 1, so x / d is each half itself: roundf takes them away from zero (2.5 -> 3)
    edge[5, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])
    return [normal, heavy, edge]


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0], ids=lambda f: f.name)
def test_quantize_writes_ggml_bytes_and_dequantize_reads_them(fmt) -> None:
    for weight in _weights():
        ours = quantize(weight, fmt)
        reference = quants.quantize(weight.numpy(), GGML_TYPES[fmt.name])
        assert ours.shape == (weight.shape[0], weight.shape[1] // 32 * fmt.block_bytes)
        assert np.array_equal(ours.numpy(), reference)
        expected = quants.dequantize(reference, GGML_TYPES[fmt.name])
        assert np.array_equal(dequantize(ours, fmt).numpy(), expected)


@pytest.mark.parametrize(("fmt", "max_relative_error"), [(Q8_0, 0.5 / 127), (Q4_0, 1 / 8)])
def test_round_trip_error_is_within_half_a_step(fmt, max_relative_error: float) -> None:
    """Each weight lands within half a quantization step (plus the fp16 rounding of the scale) of
    its value; the step is max|x| / 127 (Q8_0) or max|x| / 8 (Q4_0) of its block."""
    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    restored = dequantize(quantize(weight, fmt), fmt)
    block_max = weight.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    error = (restored - weight).reshape(-1, 32).abs()
    assert bool((error <= block_max * (max_relative_error * 1.01 + 1e-3)).all())
    assert fmt.bits_per_weight == {"q8_0": 8.5, "q4_0": 4.5}[fmt.name]


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_read_what_gguf_reads(fmt: str) -> None:
    """Q4_K, Q5_K and Q6_K (the formats of a Q4_K_M file's matmul weights): every byte pattern of the
    values and sub-block scales, with finite fp16 scales, dequantizes as the gguf package does."""
    gen = torch.Generator().manual_seed(2)
    rows, blocks_per_row = 5, 3
    block = ggml_blocks.block_format(fmt).block_bytes
    data = torch.randint(0, 256, (rows * blocks_per_row, block), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(rows * blocks_per_row, 2, generator=gen) * 0.02).to(torch.float16).view(torch.uint8)
    if fmt in ("q4_k", "q5_k"):
        data[:, :4] = scales  # d, dmin
    else:
        data[:, -2:] = scales[:, :2]  # d
    data = data.reshape(rows, -1)
    expected = quants.dequantize(data.numpy(), GGML_TYPES[fmt])
    ours = dequantize(data, fmt)
    assert ours.shape == (rows, blocks_per_row * 256)
    assert np.array_equal(ours.numpy(), expected)
    assert ggml_blocks.block_format(fmt).bits_per_weight == {"q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}[fmt]
    if fmt != "q4_k":
        with pytest.raises(ValueError, match=f"{fmt}: moetron reads this format but does not write it yet"):
            quantize(torch.zeros(2, 256), fmt)


def test_q4_k_writes_what_gguf_reads_back_close() -> None:
    """moetron's Q4_K quantizer (its own choice of scales, not llama.cpp's search): the bytes decode
    identically in the gguf package, every value lies within one step of its sub-block's grid, and
    the error is below Q4_0's on the same weights (Q4_K's per-sub-block min pays for itself)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(12, 512, generator=gen) * 0.05
    weight[2] = weight[2].abs() + 0.1  # a positive row: the min clamps to 0
    weight[5, :256] = 0.0  # an all-zero block: scales 0, decodes to zeros
    data = quantize(weight, Q4_K)
    assert data.shape == (12, 2 * 144)
    ours = dequantize(data, Q4_K)
    assert np.array_equal(ours.numpy(), quants.dequantize(data.numpy(), GGML_TYPES["q4_k"]))
    assert torch.equal(ours[5, :256], torch.zeros(256))
    sub_range = weight.reshape(-1, 32).amax(1) - weight.reshape(-1, 32).amin(1).clamp(max=0)
    step = (sub_range / 15).reshape(12, -1).repeat_interleave(32, dim=1)
    # Within a step of the 6-bit-rounded grid (scale rounding can stretch it by 1/63 of the largest).
    assert bool(((ours - weight).abs() <= step * 0.5 + sub_range.max() / 15 / 63 * 16 + 1e-4).all())
    q4_0 = dequantize(quantize(weight, Q4_0), Q4_0)
    assert (ours - weight).pow(2).mean() < (q4_0 - weight).pow(2).mean()


def test_bad_shapes_and_names_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="multiple of 32; got shape \\[4, 48\\]"):
        quantize(torch.zeros(4, 48), "q8_0")
    with pytest.raises(ValueError, match="float weights"):
        quantize(torch.zeros(4, 32, dtype=torch.int32), Q4_0)
    with pytest.raises(
        ValueError, match="unknown block format 'q5_0'; choose one of q8_0, q4_0, q4_k, q5_k, q6_k"
    ):
        ggml_blocks.block_format("q5_0")
    with pytest.raises(ValueError, match=r"q4_0 data must be uint8 \[rows, blocks \* 18\]"):
        dequantize(torch.zeros(2, 20, dtype=torch.uint8), Q4_0)
