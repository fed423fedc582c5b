"""The batch-invariant Sampler on a decode batch, against a per-row loop (`sample_row`: one
torch.multinomial per row with the row's generator, the simple batch-invariant way).

    python -m benchmarks.sampling                       # 32 rows x 32,000 vocab, 1 thread
    python -m benchmarks.sampling --rows 64 --vocab 100277 --threads 2

"peaked" logits are Zipf-like (what a trained LM gives: top-p keeps a few hundred tokens);
"flat" ones are N(0, 3²) noise (top-p keeps thousands: the worst case for its partial sort).
The per-row loop supports only temperature / top-k / top-p, so it runs only on those rows.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_line, print_table, setup_threads, time_interleaved
from moetron.infer.sampling import Sampler, SamplingState, make_generator
from moetron.infer.sampling_params import SamplingParams

CASES = {
    "greedy": (dict(temperature=0.0), "peaked"),
    "temperature": (dict(temperature=0.8), "peaked"),
    "top_p=0.95": (dict(temperature=0.8, top_p=0.95), "peaked"),
    "top_p=0.95 flat": (dict(temperature=0.8, top_p=0.95), "flat"),
    "top_k=50": (dict(temperature=0.8, top_k=50), "peaked"),
    "all knobs + logprobs=5": (
        dict(
            temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
            presence_penalty=0.5, frequency_penalty=0.3, logprobs=5,
        ),
        "peaked",
    ),
}  # fmt: skip


def sample_row(
    logits_V: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """One row's next token with temperature, top-k (0: off) and top-p only: the peer loop's step."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs_V.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs_V = probs_V.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs_V, 1, generator=generator))


def make_logits(rows: int, vocab: int, kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    if kind == "flat":
        return torch.randn(rows, vocab) * 3
    rank_V = torch.arange(1, vocab + 1, dtype=torch.float32)
    zipf_SV = -1.2 * rank_V.log().expand(rows, vocab) + 0.3 * torch.randn(rows, vocab)
    return zipf_SV.gather(1, torch.stack([torch.randperm(vocab) for _ in range(rows)]))


def candidates(logits_SV: torch.Tensor, states: list, params: SamplingParams, knobs: dict) -> dict:
    sampler = Sampler(eos_token_id=0)
    fns = {"Sampler": lambda: sampler(logits_SV, states)}
    if set(knobs) <= {"temperature", "top_p", "top_k"}:
        generators = [torch.Generator().manual_seed(i) for i in range(len(states))]
        fns["per-row loop"] = lambda: [
            sample_row(logits_SV[i], params.temperature, params.top_p, max(params.top_k, 0), generators[i])
            for i in range(len(states))
        ]
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--history", type=int, default=512, help="prompt + output tokens per row")
    args = parser.parse_args()
    setup_threads(args.threads)
    print(machine_line())
    print(f"{args.rows} rows x {args.vocab} vocab, {args.history} tokens of history per row\n")

    table = []
    for name, (knobs, kind) in CASES.items():
        params = SamplingParams(**knobs, max_tokens=args.history)
        logits_SV = make_logits(args.rows, args.vocab, kind)
        history = torch.randint(args.vocab, (args.rows, args.history)).tolist()
        states = [
            SamplingState(params, h[: args.history // 2], h[args.history // 2 :], make_generator(i, 0))
            for i, h in enumerate(history)
        ]
        fns = candidates(logits_SV, states, params, knobs)
        timings = time_interleaved(fns, repeats=7, budget_s=10.0)
        ours = timings["Sampler"].median_s
        loop = timings.get("per-row loop")
        table.append(
            [
                f"{name} ({kind})",
                f"{ours * 1e3:.1f}",
                f"{ours * 1e3 / args.rows:.3f}",
                f"{loop.median_s * 1e3:.1f}" if loop else "-",
                f"{loop.median_s / ours:.1f}x" if loop else "-",
                timings["Sampler"].count,
            ]
        )
    print_table(["case", "Sampler ms/batch", "ms/row", "per-row loop ms/batch", "speedup", "clean/n"], table)


if __name__ == "__main__":
    main()
