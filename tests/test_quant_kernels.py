"""moetron's quantized matmul kernels (moetron/kernels/quant_tiles.h) for GGML's Q8_0, Q4_0 and Q4_K
weights: against a float64 reference built from the same quantized activations, bit-identical
whatever a row is batched with, and bit-identical across every instruction-set build this CPU runs
(AVX2 and AVX-512 VNNI compute the same integer lanes)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moetron.kernels import cpu_kernels
from moetron.quant import ggml_blocks, interleave

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="moetron's CPU kernels need an AVX2 CPU and a C++ compiler"
)
FORMATS = ("q8_0", "q4_0", "q4_k", "q5_k", "q6_k")


def _quantized_weight(
    fmt: str, rows: int, width: int, gen: torch.Generator, d_range: tuple[float, float] = (0.001, 0.005)
) -> torch.Tensor:
    """GGML blocks of `fmt` for a random weight. The k-quants are random blocks with sane fp16
    scales d in `d_range` (every bit pattern of their values and sub-block scales is a valid block):
    Q5_K and Q6_K are read-only, and random Q4_K blocks reach scale and min patterns moetron's
    quantizer never makes."""
    if fmt in ("q8_0", "q4_0"):
        return ggml_blocks.quantize(torch.randn(rows, width, generator=gen) * 0.05, fmt)
    data = torch.randint(0, 256, (rows, ggml_blocks.row_bytes(fmt, width)), dtype=torch.uint8, generator=gen)
    block = ggml_blocks.block_format(fmt).block_bytes
    blocks = data.view(-1, block)
    scales = (
        (torch.rand(blocks.shape[0], 2, generator=gen) * (d_range[1] - d_range[0]) + d_range[0])
        .to(torch.float16)
        .view(torch.uint8)
    )
    if fmt in ("q4_k", "q5_k"):  # d and dmin lead the block
        blocks[:, 0:4] = scales
    else:  # Q6_K's d ends it
        blocks[:, block - 2 :] = scales[:, :2]
    return data


def _activations_q8_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's x86 quantize_row_q8_0, dequantized: d = max|x| / 127 kept as fp16, q = x * (127 /
    max|x|) rounded to nearest even."""
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    inverse = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / amax)
    q = torch.round(blocks * inverse)
    d = (amax / 127).to(torch.float16).double()
    return (q.double() * d).reshape(x.shape)


def _activations_q8_k(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's quantize_row_q8_K_ref, dequantized: the value of largest magnitude (first on ties)
    maps to -128; q = min(127, round_half_even(x * -128 / max)); d = 1 / iscale in fp32."""
    blocks = x.float().reshape(-1, 256)
    index = blocks.abs().argmax(dim=1, keepdim=True)
    peak = blocks.gather(1, index)
    iscale = torch.where(peak == 0, torch.zeros_like(peak), -128.0 / peak)
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(peak == 0, torch.zeros_like(peak), 1.0 / iscale)
    return (q.double() * d.double()).reshape(x.shape)


def _reference(x: torch.Tensor, packed: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 product of the quantized activations and the dequantized weights, and the sum of
    |terms| per element (what an fp32 accumulation's error scales with)."""
    xq = _activations_q8_k(x) if fmt in ("q4_k", "q5_k", "q6_k") else _activations_q8_0(x)
    w = ggml_blocks.dequantize(packed, fmt).double()
    return xq @ w.T, xq.abs() @ w.abs().T


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "num_rows, width, num_out", [(1, 256, 37), (3, 512, 130), (7, 768, 9), (70, 256, 101)]
)
def test_matches_the_quantized_reference(fmt: str, num_rows: int, width: int, num_out: int) -> None:
    gen = torch.Generator().manual_seed(num_rows * 7 + width + num_out)
    packed = _quantized_weight(fmt, num_out, width, gen)
    x = torch.randn(num_rows, width, generator=gen)
    x[0, :32] = 0.0  # an all-zero activation block quantizes to zeros (scale 0)
    ours = cpu_kernels.quantized_linear(x, packed, fmt)
    reference, magnitude = _reference(x, packed, fmt)
    # Integer block sums are exact; only the per-block fp32 scaling and accumulation round.
    error = (ours.double() - reference).abs()
    assert (error <= 1e-5 * magnitude + 1e-30).all(), f"{fmt}: max error {error.max():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_is_the_same_bits_whatever_it_is_batched_with(fmt: str) -> None:
    gen = torch.Generator().manual_seed(3)
    packed = _quantized_weight(fmt, 203, 512, gen)
    x = torch.randn(41, 512, generator=gen)
    full = cpu_kernels.quantized_linear(x, packed, fmt)
    for start, stop in ((0, 1), (5, 6), (3, 7), (10, 27), (40, 41), (2, 39)):
        part = cpu_kernels.quantized_linear(x[start:stop], packed, fmt)
        assert torch.equal(part, full[start:stop]), (fmt, start, stop)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_kernels.quantized_linear(x, packed, fmt), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])
def test_interleaved_rows_give_the_same_bits(fmt: str) -> None:
    """The r8 layout (8 rows' blocks interleaved: quant/interleave.py) runs other code (8 rows as 8
    lanes) for the same arithmetic: identical outputs at every row count, and the layout round-trips."""
    gen = torch.Generator().manual_seed(11)
    packed = _quantized_weight(fmt, 48, 768, gen)
    interleaved = interleave.to_r8(packed, fmt)
    assert not torch.equal(interleaved, packed) and torch.equal(interleave.from_r8(interleaved, fmt), packed)
    for num_rows in (1, 2, 3, 4, 5, 9, 70):
        x = torch.randn(num_rows, 768, generator=gen)
        ours = cpu_kernels.quantized_linear(x, interleaved, f"{fmt}_r8")
        assert torch.equal(ours, cpu_kernels.quantized_linear(x, packed, fmt)), num_rows
    with pytest.raises(ValueError, match="groups of 8 rows, not 12"):
        cpu_kernels.quantized_linear(torch.randn(1, 768), interleaved[:12], f"{fmt}_r8")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k_r8", "q4_0_r8", "q5_k_r8", "q6_k_r8"])
def test_activations_quantized_once_per_matmul_never_go_stale(fmt: str) -> None:
    """Each thread keeps the x rows it last quantized and reuses them when the next chunk's x is the
    same floats: x changed in place (same address, same shape), one value flipped, a shorter or
    strided view at the same address must all be quantized afresh, giving a fresh tensor's bits."""
    gen = torch.Generator().manual_seed(12)
    base = fmt.removesuffix("_r8")
    packed = _quantized_weight(base, 64, 512, gen)
    if fmt.endswith("_r8"):
        packed = interleave.to_r8(packed, base)
    x = torch.randn(4, 512, generator=gen)
    first = cpu_kernels.quantized_linear(x, packed, fmt)
    assert torch.equal(first, cpu_kernels.quantized_linear(x.clone(), packed, fmt))
    x[2, 300] += 1.0  # one value of one row, in place
    changed = cpu_kernels.quantized_linear(x, packed, fmt)
    assert torch.equal(changed, cpu_kernels.quantized_linear(x.clone(), packed, fmt))
    assert not torch.equal(changed[2], first[2]) and torch.equal(changed[[0, 1, 3]], first[[0, 1, 3]])
    x.mul_(-0.5)  # every row, in place
    scaled = cpu_kernels.quantized_linear(x, packed, fmt)
    assert torch.equal(scaled, cpu_kernels.quantized_linear(x.clone(), packed, fmt))
    wide = torch.randn(3, 1024, generator=gen)
    strided = wide[:, :512]  # rows 1024 floats apart
    assert torch.equal(
        cpu_kernels.quantized_linear(strided, packed, fmt),
        cpu_kernels.quantized_linear(strided.contiguous(), packed, fmt),
    )
    one_row = cpu_kernels.quantized_linear(x[:1], packed, fmt)  # fewer rows at the same address
    assert torch.equal(one_row, cpu_kernels.quantized_linear(x[:1].clone(), packed, fmt))


def _experts(fmt: str, num_experts: int, dim: int, hidden: int, gen: torch.Generator) -> list[torch.Tensor]:
    """w1, w2, w3 as [E, rows, bytes per row] blocks."""
    shapes = ((hidden, dim), (dim, hidden), (hidden, dim))
    return [
        torch.stack([_quantized_weight(fmt, rows, width, gen) for _ in range(num_experts)])
        for rows, width in shapes
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_routed_experts_over_quantized_weights(fmt: str) -> None:
    gen = torch.Generator().manual_seed(5)
    num_experts, dim, hidden, top_k, num_tokens = 4, 256, 512, 2, 9
    w1, w2, w3 = _experts(fmt, num_experts, dim, hidden, gen)
    x = torch.randn(num_tokens, dim, generator=gen)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    formats = (fmt, fmt, fmt)
    out = cpu_kernels.moe_swiglu_f32(x, weights, ids, w1, w2, w3, formats)
    # The same layer from the quantized matmul kernel, expert by expert (torch's SiLU: within 1e-5).
    reference = torch.zeros(num_tokens, dim)
    for t in range(num_tokens):
        for k in range(top_k):
            e = int(ids[t, k])
            a = cpu_kernels.quantized_linear(x[t : t + 1], w1[e], fmt)
            b = cpu_kernels.quantized_linear(x[t : t + 1], w3[e], fmt)
            reference[t] += weights[t, k] * cpu_kernels.quantized_linear(F.silu(a) * b, w2[e], fmt)[0]
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-5 * reference.abs().max().item())
    for start, stop in ((0, 1), (4, 5), (2, 8)):
        part = cpu_kernels.moe_swiglu_f32(
            x[start:stop], weights[start:stop], ids[start:stop], w1, w2, w3, formats
        )
        assert torch.equal(part, out[start:stop]), (fmt, start, stop)


def test_every_instruction_set_build_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    isas = cpu_kernels.supported_isas()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 512, generator=gen)
    many = torch.randn(70, 512, generator=gen)
    dense = torch.randn(67, 512, generator=gen)
    weights = {"f32": dense, "bf16": dense.bfloat16()}
    weights |= {fmt: _quantized_weight(fmt, 67, 512, gen) for fmt in FORMATS}
    weights |= {
        f"{fmt}_r8": interleave.to_r8(weights[fmt][:64], fmt)
        for fmt in ("q8_0", "q4_0", "q4_k", "q5_k", "q6_k")
    }
    w1, w2, w3 = _experts("q4_0", 3, 512, 256, gen)
    ids, routing = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]]), torch.rand(5, 2, generator=gen)
    results = {}
    for isa in isas:
        monkeypatch.setenv("MOETRON_CPU_ISA", isa)
        outputs = [
            cpu_kernels.linear_f32(x, w)
            if fmt in ("f32", "bf16")
            else cpu_kernels.quantized_linear(x, w, fmt)
            for fmt, w in weights.items()
        ]
        outputs.append(cpu_kernels.moe_swiglu_f32(x, routing, ids, w1, w2, w3, ("q4_0",) * 3))
        # Fewer x rows than a tile: the AVX2 build then runs 16 weight rows per pass (Lanes8x2).
        r8 = [fmt for fmt in weights if fmt.endswith("_r8")]
        outputs += [
            cpu_kernels.quantized_linear(x[:rows], weights[fmt], fmt) for fmt in r8 for rows in (1, 3)
        ]
        # More x rows than the streaming path takes: register tiles over x (AVX-512: two fp32/bf16
        # weight rows per 16-lane vector; the quantized formats' row tiles), against one row alone.
        outputs += [
            cpu_kernels.linear_f32(many, w)
            if fmt in ("f32", "bf16")
            else cpu_kernels.quantized_linear(many, w, fmt)
            for fmt, w in weights.items()
        ]
        results[isa] = outputs
        for fmt, w in weights.items():
            matmul = (
                cpu_kernels.linear_f32
                if fmt in ("f32", "bf16")
                else partial(cpu_kernels.quantized_linear, fmt=fmt)
            )
            alone = torch.cat([matmul(many[i : i + 1], w) for i in (0, 33, 69)])
            assert torch.equal(alone, matmul(many, w)[[0, 33, 69]]), (isa, fmt)
    names = [
        *weights,
        "moe",
        *(f"{fmt} x{rows}" for fmt in r8 for rows in (1, 3)),
        *(f"{fmt} x70" for fmt in weights),
    ]
    first = results[isas[0]]
    for isa in isas[1:]:
        for fmt, ours, theirs in zip(names, results[isa], first, strict=True):
            assert torch.equal(ours, theirs), (isa, fmt)


def test_an_unsupported_isa_or_a_wrong_row_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOETRON_CPU_ISA", "sse2")
    with pytest.raises(ValueError, match="MOETRON_CPU_ISA='sse2'"):
        cpu_kernels.available()
    monkeypatch.delenv("MOETRON_CPU_ISA")
    packed = ggml_blocks.quantize(torch.randn(4, 64), "q8_0")
    with pytest.raises(ValueError, match="not q8_0 rows of 96"):
        cpu_kernels.quantized_linear(torch.randn(1, 96), packed, "q8_0")
    with pytest.raises(ValueError, match="q4_k holds rows of a multiple of 256"):
        cpu_kernels.quantized_linear(torch.randn(1, 64), packed, "q4_k")
