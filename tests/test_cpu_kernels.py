"""moetron's own CPU matmul kernel (moetron/kernels/linear_avx2.cpp): correct against torch, and
batch-invariant by construction (a row's bits never depend on the other rows or on threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import torch_threads

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
# (2053, 101): wide rows get shorter weight chunks (chunk_rows: 24 here), so N spans 4 x 24 + 5
@pytest.mark.parametrize(
    "num_in, num_out", [(64, 48), (1027, 37), (5, 3), (8, 1), (256, 130), (1, 9), (2053, 101)]
)
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
@pytest.mark.parametrize("num_rows", [1, 5, 8, 67])
def test_bf16_weights_give_their_float32_copys_bits(num_rows: int) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    w = torch.randn(101, 2053, generator=gen).bfloat16()  # K tail, several weight chunks
    x = torch.randn(num_rows, 2053, generator=gen)
    assert torch.equal(cpu_kernels.linear_f32(x, w), cpu_kernels.linear_f32(x, w.float()))
    with pytest.raises(ValueError, match="want float32"):
        cpu_kernels.linear_f32(x.double(), w)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_are_invariant_to_row_count_place_and_threads(threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    w = torch.randn(203, 517, generator=gen)  # odd N and K: tails in both
    x = torch.randn(70, 517, generator=gen)
    with torch_threads(threads):
        full = cpu_kernels.linear_f32(x, w)
        for start, stop in [(0, 1), (5, 6), (3, 7), (1, 66), (69, 70), (10, 12)]:
            assert torch.equal(cpu_kernels.linear_f32(x[start:stop], w), full[start:stop]), (start, stop)
        shuffled = torch.randperm(70, generator=gen)
        assert torch.equal(cpu_kernels.linear_f32(x[shuffled], w), full[shuffled])
    with torch_threads(1):  # and the same bits at every thread count
        assert torch.equal(cpu_kernels.linear_f32(x, w), full)


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


def reference_moe(x, weights, ids, w1, w2, w3) -> torch.Tensor:
    """The routed-expert layer in float64, one (token, expert) pair at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e, x_t = ids[t, k], x[t].double()
            hidden = torch.nn.functional.silu(w1[e].double() @ x_t) * (w3[e].double() @ x_t)
            out[t] += weights[t, k].double() * (w2[e].double() @ hidden)
    return out


@needs_kernels
@pytest.mark.parametrize(
    "num_tokens, top_k, dim, hidden, num_experts",
    [
        (1, 2, 64, 128, 8),
        (37, 3, 40, 17, 5),
        (130, 1, 72, 9, 4),
        (9, 2, 100, 1100, 4),
    ],  # last: w2 in 84 + 16 rows
)
def test_moe_matches_reference_and_is_invariant(num_tokens, top_k, dim, hidden, num_experts) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, dim, generator=gen)
    w1, w3 = (torch.randn(num_experts, hidden, dim, generator=gen) / dim**0.5 for _ in range(2))
    w2 = torch.randn(num_experts, dim, hidden, generator=gen) / hidden**0.5
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    out = cpu_kernels.moe_swiglu_f32(x, weights, ids, w1, w2, w3)
    # silu from a polynomial exp (~2e-7 relative) and fp32 sums: well inside 1e-5 at unit scale
    torch.testing.assert_close(out.double(), reference_moe(x, weights, ids, w1, w2, w3), rtol=1e-5, atol=1e-5)
    for start, stop in [(0, 1), (num_tokens - 1, num_tokens), (num_tokens // 3, num_tokens // 2 + 1)]:
        part = cpu_kernels.moe_swiglu_f32(x[start:stop], weights[start:stop], ids[start:stop], w1, w2, w3)
        assert torch.equal(part, out[start:stop])


@needs_kernels
def test_moe_rejects_bad_expert_ids_and_shapes() -> None:
    x, w1, w2 = torch.randn(2, 8), torch.randn(3, 4, 8), torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match="expert ids"):
        cpu_kernels.moe_swiglu_f32(x, torch.ones(2, 1), torch.tensor([[0], [3]]), w1, w2, w1)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.moe_swiglu_f32(x, torch.ones(2, 1), torch.tensor([[0], [1]]), w1, w1, w1)


def paged_cache(keys_GCd: torch.Tensor, block_size: int, num_blocks: int, gen: torch.Generator, table=None):
    """keys [G, C, d] scattered into a [N, S, G, d] cache along a shuffled block table (or `table`)."""
    num_kv_heads, length, head_dim = keys_GCd.shape
    if table is None:
        table = torch.randperm(num_blocks, generator=gen)[: -(-length // block_size)]
    cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)  # garbage elsewhere
    for position in range(length):
        cache[table[position // block_size], position % block_size] = keys_GCd[:, position]
    return cache, table


@needs_kernels
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 16), (6, 2, 10), (2, 1, 3), (8, 8, 64)])
def test_paged_attention_matches_sdpa_and_is_invariant(num_heads, num_kv_heads, head_dim) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    length, block_size = 45, 8
    q_HCd = torch.randn(num_heads, length, head_dim, generator=gen)
    k_GCd, v_GCd = (torch.randn(num_kv_heads, length, head_dim, generator=gen) for _ in range(2))
    k_cache, table = paged_cache(k_GCd, block_size, 12, gen)
    v_cache = paged_cache(v_GCd, block_size, 12, torch.Generator().manual_seed(head_dim), table)[0]
    expected_HCd = torch.nn.functional.scaled_dot_product_attention(
        q_HCd[None], k_GCd[None], v_GCd[None], is_causal=True, enable_gqa=True
    )[0]

    def attend(rows: list[int]) -> torch.Tensor:
        tables = table[None].contiguous()
        seq_of_row = torch.zeros(len(rows), dtype=torch.long)
        return cpu_kernels.paged_attention_f32(
            q_HCd.transpose(0, 1)[rows], k_cache, v_cache, tables, seq_of_row, torch.tensor(rows)
        )

    all_rows = attend(list(range(length)))
    torch.testing.assert_close(all_rows.transpose(0, 1), expected_HCd, rtol=1e-5, atol=1e-5)
    for rows in ([length - 1], [0], [7, 8, 9], [44, 3, 20]):
        assert torch.equal(attend(rows), all_rows[rows])


@needs_kernels
@pytest.mark.parametrize("dim", [1, 7, 40, 1024])
def test_rms_norm_matches_torch_and_is_row_wise(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    x, weight = torch.randn(9, dim, generator=gen) * 3, torch.randn(dim, generator=gen)
    out = cpu_kernels.rms_norm_f32(x, weight, 1e-5)
    torch.testing.assert_close(
        out, torch.nn.functional.rms_norm(x, (dim,), weight, eps=1e-5), rtol=2e-6, atol=2e-6
    )
    assert torch.equal(cpu_kernels.rms_norm_f32(x[4:5], weight, 1e-5), out[4:5])
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.rms_norm_f32(x, weight[:-1] if dim > 1 else torch.ones(2), 1e-5)


def test_a_failing_compiler_turns_the_kernels_off_with_a_warning(tmp_path) -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("CPU without AVX2: the kernels are off before any compiler runs")
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from moetron.kernels import cpu_kernels\n"
        "    print(cpu_kernels.available())\n"
        "print(' | '.join(str(w.message) for w in caught))\n"
    )
    env = {"CXX": "/bin/false", "MOETRON_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    available, message = result.stdout.strip().splitlines()
    assert available == "False"
    assert "CPU kernels are off" in message and "/bin/false failed" in message
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left to load
