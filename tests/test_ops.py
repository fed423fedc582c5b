"""Kernel selection in moetron/model/ops.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetron.hardware import native_bf16_matmul
from moetron.model.ops import emulated_half_dtype, grouped_linear, linear


def test_grouped_linear_matches_per_group_matmul() -> None:
    """The CUDA path's offsets/transpose convention, checked with torch's CPU grouped_mm forward."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch without F.grouped_mm")  # torch < 2.9: the loop path is the only path
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 8]  # an empty group included
    x = torch.randn(sum(counts), 16, generator=gen)
    weight = torch.randn(len(counts), 8, 16, generator=gen)
    offsets = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    expected, start = [], 0
    for e, c in enumerate(counts):
        expected.append(x[start : start + c] @ weight[e].T)
        start += c
    torch.testing.assert_close(grouped_linear(x, weight, offsets), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_half_precision_linear_is_accurate() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 64, generator=gen), torch.randn(32, 64, generator=gen)
    out = linear(x.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    reference = F.linear(x.bfloat16().float(), w.bfloat16().float())  # exact products of the bf16 inputs
    # one bf16 rounding of the result (8 mantissa bits) at most, whichever kernel runs
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=1e-2)


def test_emulation_only_for_half_precision_without_native_kernels() -> None:
    assert emulated_half_dtype(torch.zeros(1)) is None
    assert emulated_half_dtype(torch.zeros(1, dtype=torch.float64)) is None
    expected = None if native_bf16_matmul("cpu") else torch.bfloat16
    assert emulated_half_dtype(torch.zeros(1, dtype=torch.bfloat16)) == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emulated_half_dtype(torch.zeros(1)) == expected


def test_linear_under_autocast_matches_native_autocast_numerics() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, generator=gen), torch.randn(16, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, native = linear(x, w), F.linear(x, w)
    assert ours.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), native.float(), rtol=2**-7, atol=1e-2)
