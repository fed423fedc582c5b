"""moetron's own CPU matmul kernel (moetron/kernels/linear_avx2.cpp): correct against torch, and
batch-invariant by construction (a row's bits never depend on the other rows or on threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moetron.infer import batch_invariant
from moetron.kernels import cpu_kernels

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="moetron's CPU kernels need an AVX2 CPU and a C++ compiler"
)


def test_kernels_build_on_this_machine() -> None:
    # CI machines have AVX2 and g++: the fast invariant path must really be the one tested there.
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("CPU without AVX2")
    assert cpu_kernels.available()


@needs_kernels
@pytest.mark.parametrize("num_in, num_out", [(64, 48), (1027, 37), (5, 3), (8, 1), (256, 130), (1, 9)])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 7, 64, 67, 130])
def test_matches_torch(num_rows: int, num_in: int, num_out: int) -> None:
    gen = torch.Generator().manual_seed(num_rows * 1000 + num_in + num_out)
    x = torch.randn(num_rows, num_in, generator=gen)
    w = torch.randn(num_out, num_in, generator=gen)
    ours = cpu_kernels.linear_f32(x, w)
    reference = (x.double() @ w.double().T).float()
    # fp32 dot products of length K: error grows like sqrt(K) * eps * |x||w|
    tolerance = 1e-6 * num_in**0.5 * x.abs().max() * w.abs().max() * 8
    torch.testing.assert_close(ours, reference, rtol=0, atol=float(tolerance))


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_are_invariant_to_row_count_place_and_threads(threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    w = torch.randn(203, 517, generator=gen)  # odd N and K: tails in both
    x = torch.randn(70, 517, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = cpu_kernels.linear_f32(x, w)
        for start, stop in [(0, 1), (5, 6), (3, 7), (1, 66), (69, 70), (10, 12)]:
            assert torch.equal(cpu_kernels.linear_f32(x[start:stop], w), full[start:stop]), (start, stop)
        shuffled = torch.randperm(70, generator=gen)
        assert torch.equal(cpu_kernels.linear_f32(x[shuffled], w), full[shuffled])
    finally:
        torch.set_num_threads(previous)
    # and the same bits at every thread count
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpu_kernels.linear_f32(x, w), full)
    finally:
        torch.set_num_threads(previous)


@needs_kernels
def test_takes_batched_and_strided_inputs() -> None:
    x = torch.randn(2, 3, 40)
    w_t = torch.randn(40, 24)  # a transposed (non-contiguous) weight
    out = cpu_kernels.linear_f32(x, w_t.T)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ w_t, rtol=1e-5, atol=1e-5)
    x_strided = torch.randn(6, 80)[:, ::2]
    torch.testing.assert_close(
        cpu_kernels.linear_f32(x_strided, w_t.T), x_strided @ w_t, rtol=1e-5, atol=1e-5
    )
    assert cpu_kernels.linear_f32(torch.randn(0, 40), w_t.T).shape == (0, 24)


@needs_kernels
def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.linear_f32(torch.randn(2, 5), torch.randn(3, 4))


@needs_kernels
def test_supports_only_fp32_cpu_without_autograd() -> None:
    w = torch.randn(4, 8)
    assert cpu_kernels.supports(torch.randn(2, 8), w)
    assert not cpu_kernels.supports(torch.randn(2, 8, dtype=torch.bfloat16), w)
    assert not cpu_kernels.supports(torch.randn(2, 8, requires_grad=True), w)
    with torch.no_grad():
        assert cpu_kernels.supports(torch.randn(2, 8, requires_grad=True), w)


@needs_kernels
def test_serving_kernels_route_small_products_to_the_kernel_in_both_modes() -> None:
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    expected = cpu_kernels.linear_f32(x, w)
    for invariant in (True, False):
        with batch_invariant.serving_kernels(invariant):
            assert torch.equal(batch_invariant.ops.linear(x, w), expected)
    assert batch_invariant.ops.serving_linear is None  # training numerics untouched outside


def test_disabled_by_environment_variable() -> None:
    code = "from moetron.kernels import cpu_kernels; print(cpu_kernels.available())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"MOETRON_CPU_KERNELS": "0", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"
