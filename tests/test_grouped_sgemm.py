"""The grouped fp32 matmuls of CPU MoE training (kernels/grouped_sgemm.cpp via
cpu_kernels.grouped_sgemm, scheduled by train/moe_cpu_kernels.py): torch.mm's bits at one thread
for every operand layout the experts' products use, whatever thread runs which group, and nothing
written where a product is not one BLAS takes."""

from __future__ import annotations

import pytest
import torch
from conftest import torch_threads

from moetron.kernels import cpu_kernels
from moetron.model.grouped_swiglu_cpu import Product, torch_matmuls
from moetron.train import moe_cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.grouped_sgemm_available(), reason="no moetron CPU kernels or no MKL in this torch"
)


def _groups(seed: int) -> list[list[Product]]:
    """Each layout the experts' products take (grouped_swiglu_cpu): x @ w^T, dy @ w, dy^T @ x, and
    an accumulation into an earlier product's output; rows sliced from a wider buffer (a leading
    dimension over the width), a 9 x 16 x 24 product (where MKL's multi-threaded bits differ from
    its single-threaded ones) and a single row."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    groups = []
    for rows, dim, hidden in ((9, 16, 24), (130, 64, 96), (1, 32, 48), (257, 48, 40)):
        x = randn(rows, dim + 5)[:, :dim]  # a row stride of dim + 5
        w1, w3, dy = randn(hidden, dim), randn(hidden, dim), randn(rows, hidden)
        h, dw, dx = torch.empty(rows, hidden), torch.empty(hidden, dim), torch.empty(rows, dim)
        groups.append([
            (x, w1.t(), h, False),  # x @ w^T: b a transposed view
            (dy.t(), x, dw, False),  # dy^T @ x: a a transposed view
            (dy, w1, dx, False),
            (dy, w3, dx, True),  # adds into the product before it
        ])  # fmt: skip
    return groups


def _outputs(groups: list[list[Product]]) -> list[torch.Tensor]:
    return [out.clone() for group in groups for _, _, out, _ in group]


def test_grouped_sgemm_gives_torch_mm_bits_at_one_thread_on_any_schedule() -> None:
    expected_groups = _groups(0)
    with torch_threads(1):
        torch_matmuls(expected_groups)
    expected = _outputs(expected_groups)
    schedules = [[0, 0, 0, 0], [0, 1, 0, 1], [1, 0, 1, 1]]  # thread 1 folds onto 0 on one thread
    for thread_of in schedules:
        groups = _groups(0)
        assert cpu_kernels.grouped_sgemm(groups, thread_of)
        for got, want in zip(_outputs(groups), expected, strict=True):
            assert torch.equal(got, want), thread_of
    # and the values are the products' (no output stale or misplaced): h, dw, and dx of both
    for group in _groups(0):
        (x, w1_t, _, _), _, (dy, w1, _, _), (_, w3, _, _) = (
            (*(t.double() for t in p[:3]), p[3]) for p in group
        )
        h, dw, dx, _ = expected[:4]
        expected = expected[4:]
        for value, want in ((h, x @ w1_t), (dw, dy.t() @ x), (dx, dy @ w1 + dy @ w3)):
            torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: t.to(torch.bfloat16),  # not fp32
        lambda t: t[:, ::2].t(),  # no unit stride either way (a [2, 3] view of a [3, 4] matrix)
        lambda t: t.unsqueeze(0),  # a batch of matrices (bf16 runs' bmm)
        # one row whose leading dimension (2^31) an LP64 BLAS cannot take (its 4 values are all
        # the storage a single row reads)
        lambda t: t[:1].as_strided((1, 4), (2**31, 1)),
    ],
    ids=["bf16", "no_unit_stride", "batched", "size_over_int32"],
)
def test_grouped_sgemm_runs_nothing_when_a_product_is_not_for_blas(bad) -> None:
    sentinel = torch.full((3, 3), 7.0)
    good = (torch.randn(3, 4), torch.randn(4, 3), sentinel, False)
    a = bad(torch.randn(3, 4))
    b = torch.randn(a.shape[-1], 2, dtype=a.dtype)
    out = torch.zeros(*a.shape[:-1], 2, dtype=a.dtype)
    assert not cpu_kernels.grouped_sgemm([[good], [(a, b, out, False)]], [0, 0])
    assert torch.equal(sentinel, torch.full((3, 3), 7.0)) and not out.any()


def test_spread_over_threads_balances_costs_or_declines() -> None:
    assert moe_cpu_kernels.spread_over_threads([5, 4, 3, 3, 2, 1], 2) == [0, 1, 1, 0, 1, 0]  # 9 and 9
    assert moe_cpu_kernels.spread_over_threads([4, 4, 4, 4], 3) is None  # 8 on one thread: 1.5x even
    assert moe_cpu_kernels.spread_over_threads([10, 1, 1], 2) is None
    assert moe_cpu_kernels.spread_over_threads([3, 1, 2], 1) == [0, 0, 0]
    assert moe_cpu_kernels.spread_over_threads([], 2) == []
