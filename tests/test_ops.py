"""Kernel selection in moetron/model/ops.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetron.model.ops import grouped_linear, linear, upcast_half_matmul


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


def test_upcast_only_for_half_precision_on_cpu() -> None:
    assert not upcast_half_matmul(torch.zeros(1))
    assert not upcast_half_matmul(torch.zeros(1, dtype=torch.float64))
