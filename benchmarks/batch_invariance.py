"""Batch invariance on this machine: does it hold, and what does it cost?

    python -m benchmarks.batch_invariance                   # minutes on 2 cores
    python -m benchmarks.batch_invariance --dim 1024 --threads 1 --batches 1,4,16

(1) Probes: for matmul shapes of the serving path, how many rows come out with other bits when
    computed alone vs inside a larger batch: with F.linear, with moetron's invariant_linear
    (moetron/infer/batch_invariant.py: the AVX2 kernel where it is available, else padded MKL) and
    with moetron's kernel itself (cpu_kernels.linear_f32), and invariant_linear's padded-MKL
    fallback with the kernels off; same for attention of a query chunk of a prefill vs the whole
    prefill, with SDPA, invariant_attention (the torch fallback) and moetron's paged-attention
    kernel (each also checked against SDPA's values). Then the candidate kernels for the token-dimension matmuls (moetron's
    kernel and the torch-only candidates tried before it): invariance and time of 1 / 16 rows.
(2) Cost: engine decode tokens/s (greedy, prompt 32, EOS ignored; decode steps only, the prefill
    step is not timed) at each --batches size, in these configurations:
      torch plain            batch_invariant=False, moetron's kernels off (torch/MKL only)
      plain                  batch_invariant=False with moetron's kernels
      invariant              batch_invariant=True with moetron's kernels (the engine's default)
      invariant (fallback)   batch_invariant=True, kernels off (padded MKL, as on a machine
                             without AVX2 or a compiler)
    "Kernels off" patches cpu_kernels.available to return False for the run (moetron checks it
    at call time). The cost of invariance is measured against the *fastest* non-invariant
    configuration: cost = 1 - invariant / max(plain, torch plain). Runs are interleaved so load
    drift on a shared machine hits every configuration; the best of --repeats is reported.
    Without moetron's kernels only "plain" and "invariant" run (both on torch's kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, setup_threads
from moetron.config import EngineConfig, ModelConfig, MoEConfig
from moetron.infer.batch_invariant import invariant_linear
from moetron.infer.engine import LLMEngine
from moetron.infer.paged_attention import invariant_attention
from moetron.infer.sampling_params import SamplingParams
from moetron.kernels import cpu_kernels
from moetron.model import Transformer

KERNELS_OFF_REASON = (
    "moetron's CPU kernels are not available here (no AVX2/FMA, no compiler, or MOETRON_CPU_KERNELS=0)"
)
PROBE_BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes for the cost part")
    return p.parse_args()


@contextlib.contextmanager
def kernels_disabled(disabled: bool = True) -> Iterator[None]:
    """With `disabled`, moetron sees no CPU kernels for the duration (everything in moetron asks
    cpu_kernels.available() at call time, and cpu_kernels.supports() asks it too)."""
    saved = cpu_kernels.available
    if disabled:
        cpu_kernels.available = lambda: False
    try:
        yield
    finally:
        cpu_kernels.available = saved


def probe_linear(linear, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(rows differing, rows checked): each row alone vs at its place in batches of 8..296 rows."""
    gen = torch.Generator().manual_seed(0)
    bad = total = 0
    for k, n in shapes:
        w, x = torch.randn(n, k, generator=gen), torch.randn(300, k, generator=gen)
        for rows in (8, 24, 136, 296):
            full = linear(x[:rows], w)
            for i in range(0, rows, 7):
                total += 1
                bad += not torch.equal(linear(x[i : i + 1], w)[0], full[i])
    return bad, total


def probe_attention(attend) -> tuple[int, int, float]:
    """(chunks differing, chunks checked, max |difference| of the whole prefill from SDPA's): a
    chunk of queries vs the same queries in a whole prefill; the last number checks the values."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, length = 8, 2, 64, 700
    q = torch.randn(heads, length, head_dim, generator=gen)
    k, v = (torch.randn(kv_heads, 768, head_dim, generator=gen) for _ in range(2))
    full = attend(q, k, v, 0)
    deviation = (full - sdpa_chunk(q, k, v, 0)).abs().max().item()
    bad = total = 0
    for start, num in ((0, 1), (5, 3), (100, 57), (333, 1), (500, 200), (699, 1)):
        total += 1
        bad += not torch.equal(attend(q[:, start : start + num], k, v, start), full[:, start : start + num])
    return bad, total, deviation


def kernel_attention(
    q_Hnd: torch.Tensor, k_GCd: torch.Tensor, v_GCd: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """invariant_attention's signature on moetron's paged-attention kernel: the keys and values laid
    out as one sequence's paged cache [num_blocks, block_size, G, d] with an identity block table;
    query row i sits at position first_pos + i."""
    num_kv_heads, num_keys, head_dim = k_GCd.shape
    num_new = q_Hnd.shape[1]
    num_blocks = -(-num_keys // PROBE_BLOCK_SIZE)
    pad = num_blocks * PROBE_BLOCK_SIZE - num_keys
    k_cache, v_cache = (
        F.pad(t.transpose(0, 1).float(), (0, 0, 0, 0, 0, pad))
        .reshape(num_blocks, PROBE_BLOCK_SIZE, num_kv_heads, head_dim)
        .contiguous()
        for t in (k_GCd, v_GCd)
    )
    block_tables_QB = torch.arange(num_blocks, dtype=torch.int64)[None]
    seq_of_row_T = torch.zeros(num_new, dtype=torch.int64)
    pos_of_row_T = first_pos + torch.arange(num_new, dtype=torch.int64)
    out_THd = cpu_kernels.paged_attention_f32(
        q_Hnd.transpose(0, 1).float(), k_cache, v_cache, block_tables_QB, seq_of_row_T, pos_of_row_T
    )
    return out_THd.transpose(0, 1)


def transposed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Candidate: W @ x.T, the rows as a narrow second operand (padded to 4 columns)."""
    rows = x.shape[0]
    return torch.mm(w, F.pad(x, (0, 0, 0, -rows % 4)).T)[:, :rows].T


def rowwise_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Candidate: one [1, K] x [K, N] product per row in a single bmm (the weight expanded, not copied)."""
    return torch.bmm(x[:, None, :], w.T.expand(x.shape[0], *w.T.shape))[:, 0]


def time_us(fn, repeats: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def candidate_kernels(dim: int) -> None:
    """Each candidate's invariance (probe_linear) and time at 1 and 16 rows of the model's widest
    serving matmuls: an expert's w1 [2*dim, dim] and the output head [8192, dim]. invariant_linear
    is measured as installed (moetron's kernel when available); "invariant (fallback)" is its
    padded-MKL path with the kernels off."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(dim, dim), (dim, 2 * dim), (40, 211), (17, 10)]
    weights = [torch.randn(2 * dim, dim, generator=gen), torch.randn(8192, dim, generator=gen)]
    candidates = [("F.linear", F.linear, False)]
    if cpu_kernels.available():
        candidates += [("moetron kernel", cpu_kernels.linear_f32, False)]
        candidates += [("invariant_linear", invariant_linear, False)]
    candidates += [
        ("invariant (fallback)", invariant_linear, True),
        ("transposed_linear", transposed_linear, False),
        ("rowwise_linear", rowwise_linear, False),
    ]
    for name, linear, kernels_off in candidates:
        with kernels_disabled(kernels_off):
            bad, total = probe_linear(linear, shapes)
            times = []
            for w in weights:
                for rows in (1, 16):
                    x = torch.randn(rows, dim, generator=gen)
                    times.append(f"{time_us(lambda x=x, w=w, f=linear: f(x, w)):6.0f}")
        print(
            f"{name:>20}: {bad:3d}/{total} rows differ; us at (rows, N) = (1, 2D) (16, 2D) (1, V) (16, V):",
            *times,
        )


def sdpa_chunk(q, k, v, first_pos):
    c = first_pos + q.shape[1]
    mask = torch.arange(c)[None, :] <= torch.arange(first_pos, c)[:, None]
    return F.scaled_dot_product_attention(
        q[None], k[None, :, :c], v[None, :, :c], attn_mask=mask, enable_gqa=True
    )[0]


def decode_tokens_per_s(model: Transformer, invariant: bool, batch: int, new_tokens: int) -> float:
    engine = LLMEngine(model, None, EngineConfig(num_kv_blocks=64 * batch, batch_invariant=invariant))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.cfg.vocab_size, (32,), generator=gen).tolist(), params)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


def probes(dim: int, kernels: bool) -> None:
    shapes = [(dim, dim), (dim, 2 * dim), (2 * dim, dim), (dim, 8), (17, 10), (40, 211)]
    linears = [("F.linear", F.linear, False)]
    attends = [("SDPA + mask", sdpa_chunk, False), ("invariant_attention", invariant_attention, False)]
    if kernels:
        linears += [
            ("moetron kernel", cpu_kernels.linear_f32, False),
            ("invariant_linear", invariant_linear, False),
            ("invariant (fallback)", invariant_linear, True),
        ]
        attends += [("moetron kernel", kernel_attention, False)]
    else:
        print(f"probes of moetron's kernels skipped: {KERNELS_OFF_REASON}")
        linears += [("invariant_linear", invariant_linear, False)]
    for name, linear, kernels_off in linears:
        with kernels_disabled(kernels_off):
            bad, total = probe_linear(linear, shapes)
        print(f"probe linear    {name:>20}: {bad}/{total} rows differ alone vs batched")
    # invariant_attention is torch-only (the engine's fallback when the kernel is unavailable).
    for name, attend, kernels_off in attends:
        with kernels_disabled(kernels_off):
            bad, total, deviation = probe_attention(attend)
        print(
            f"probe attention {name:>20}: {bad}/{total} prefill chunks differ from the whole prefill"
            f" (whole prefill vs SDPA: max |diff| {deviation:.1e})"
        )


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    print(machine_line())
    kernels = cpu_kernels.available()  # builds (or loads the cached) kernel library before any timing
    print(f"moetron's CPU kernels: {'available' if kernels else 'unavailable'}")
    dim = args.dim
    probes(dim, kernels)
    print("\ncandidate kernels for the token-dimension matmuls:")
    candidate_kernels(dim)

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8192, dim=dim, num_layers=args.num_layers, num_heads=dim // 64, num_kv_heads=max(1, dim // 256),
        max_seq_len=512, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=2 * dim),
    )  # fmt: skip
    model = Transformer.from_config(cfg).eval()
    # (label, batch_invariant, moetron's kernels off)
    if kernels:
        configs = [
            ("torch plain", False, True),
            ("plain", False, False),
            ("invariant", True, False),
            ("invariant (fallback)", True, True),
        ]
    else:
        print(f"\n{KERNELS_OFF_REASON}: plain and invariant both run on torch's kernels")
        configs = [("plain", False, False), ("invariant", True, False)]
    print(
        f"\nmodel: dim {dim}, {args.num_layers} layers, 8 experts top-2, fp32; decode tokens/s (best of {args.repeats});"
        " cost = 1 - invariant / fastest non-invariant"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        best = dict.fromkeys((label for label, _, _ in configs), 0.0)
        for _ in range(args.repeats):
            for label, invariant, kernels_off in configs:
                with kernels_disabled(kernels_off):
                    rate = decode_tokens_per_s(model, invariant, batch, args.new_tokens)
                best[label] = max(best[label], rate)
        fastest_plain = max(best[label] for label, invariant, _ in configs if not invariant)
        rates = "  ".join(f"{label} {rate:7.1f}" for label, rate in best.items())
        line = f"batch {batch:>2}: {rates}  cost {100 * (1 - best['invariant'] / fastest_plain):5.1f}%"
        if "invariant (fallback)" in best:
            line += f"  (fallback {100 * (1 - best['invariant (fallback)'] / fastest_plain):5.1f}%)"
        print(line)


if __name__ == "__main__":
    main()
