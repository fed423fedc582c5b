"""Batch invariance on this machine: does it hold, and what does it cost?

    python -m benchmarks.batch_invariance                   # ~2 min on 2 cores
    python -m benchmarks.batch_invariance --dim 1024 --threads 1

(1) Probes: for matmul shapes of the serving path, how many rows come out with other bits when
    computed alone vs inside a larger batch, with plain kernels and with moetron's invariant ones
    (moetron/infer/batch_invariant.py); same for attention of a query in a prefill chunk vs whole.
    Also the candidate kernels tried in place of padded rows (moetron/infer/batch_invariant.py's
    docstring has the conclusions): invariance and time of one row / 16 rows per kernel.
(2) Cost: engine decode tokens/s with batch_invariant on and off, at batch 1 and 16 (greedy,
    prompt 32, EOS ignored; decode steps only, the prefill step is not timed). Runs alternate
    on/off so load drift on a shared machine hits both; the best of --repeats is reported.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, setup_threads
from moetron.config import ModelConfig, MoEConfig
from moetron.infer.batch_invariant import invariant_linear
from moetron.infer.config import EngineConfig
from moetron.infer.engine import LLMEngine
from moetron.infer.paged_attention import invariant_attention
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


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


def probe_attention(attend) -> tuple[int, int]:
    """(chunks differing, chunks checked): a chunk of queries vs the same queries in a whole prefill."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, length = 8, 2, 64, 700
    q = torch.randn(heads, length, head_dim, generator=gen)
    k, v = (torch.randn(kv_heads, 768, head_dim, generator=gen) for _ in range(2))
    full = attend(q, k, v, 0)
    bad = total = 0
    for start, num in ((0, 1), (5, 3), (100, 57), (333, 1), (500, 200), (699, 1)):
        total += 1
        bad += not torch.equal(attend(q[:, start : start + num], k, v, start), full[:, start : start + num])
    return bad, total


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
    serving matmuls: an expert's w1 [2*dim, dim] and the output head [8192, dim]."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(dim, dim), (dim, 2 * dim), (40, 211), (17, 10)]
    weights = [torch.randn(2 * dim, dim, generator=gen), torch.randn(8192, dim, generator=gen)]
    for name, linear in (
        ("F.linear", F.linear),
        ("invariant_linear", invariant_linear),
        ("transposed_linear", transposed_linear),
        ("rowwise_linear", rowwise_linear),
    ):
        bad, total = probe_linear(linear, shapes)
        times = []
        for w in weights:
            for rows in (1, 16):
                x = torch.randn(rows, dim, generator=gen)
                times.append(f"{time_us(lambda x=x, w=w, f=linear: f(x, w)):6.0f}")
        print(
            f"{name:>18}: {bad:3d}/{total} rows differ; us at (rows, N) = (1, 2D) (16, 2D) (1, V) (16, V):",
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


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    print(machine_line())
    dim = args.dim
    shapes = [(dim, dim), (dim, 2 * dim), (2 * dim, dim), (dim, 8), (17, 10), (40, 211)]
    for name, linear in (("F.linear", F.linear), ("invariant_linear", invariant_linear)):
        bad, total = probe_linear(linear, shapes)
        print(f"probe {name:>18}: {bad}/{total} rows differ alone vs batched")
    for name, attend in (("SDPA + mask", sdpa_chunk), ("invariant_attention", invariant_attention)):
        bad, total = probe_attention(attend)
        print(f"probe {name:>18}: {bad}/{total} prefill chunks differ from the whole prefill")
    print("\ncandidate kernels for the token-dimension matmuls:")
    candidate_kernels(dim)

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8192, dim=dim, num_layers=args.num_layers, num_heads=dim // 64, num_kv_heads=max(1, dim // 256),
        max_seq_len=512, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=2 * dim),
    )  # fmt: skip
    model = Transformer.from_config(cfg).eval()
    print(
        f"\nmodel: dim {dim}, {args.num_layers} layers, 8 experts top-2, fp32; decode tokens/s (best of {args.repeats})"
    )
    for batch in (1, 16):
        best = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for invariant in (False, True):
                rate = decode_tokens_per_s(model, invariant, batch, args.new_tokens)
                best[invariant] = max(best[invariant], rate)
        cost = 100 * (1 - best[True] / best[False])
        print(f"batch {batch:>2}: plain {best[False]:7.1f}  invariant {best[True]:7.1f}  cost {cost:5.1f}%")


if __name__ == "__main__":
    main()
