"""Acceptance rates of n-gram (prompt-lookup) speculation on repetitive text.

    python -m benchmarks.speculative_acceptance            # minutes: full-recompute target forwards
    python -m benchmarks.speculative_acceptance --steps 150 --k 2 4 8

Trains the `tiny` preset for a few hundred steps on a repetitive, templated text (numbered lines
of a refrain, like logs or code), then generates continuations of held-out prompts with
`speculative_generate` and the n-gram proposer, greedy and sampled, reporting the fraction of
proposed tokens accepted and the tokens produced per target forward (1 + accepted per step).
The untrained model is the baseline: sampled, its near-uniform outputs almost never match a
proposal; greedy, it falls into loops that the n-gram proposer predicts well. Acceptance depends
entirely on how predictable the text is for the target; these are numbers for this text only.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import machine_line, print_table, setup_threads
from moetron.config import tiny
from moetron.data.tokenizer import train_bpe
from moetron.infer.sampling_params import SamplingParams
from moetron.infer.speculative import NgramProposer, SpeculativeStats, speculative_generate
from moetron.model.transformer import Transformer

WORDS = ["fox", "dog", "cat", "owl", "bee", "elk"]


def corpus(num_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        a, b = rng.sample(WORDS, 2)
        lines.append(f"line {i}: the quick brown {a} jumps over the lazy {b}, and the {b} sleeps on.\n")
    return "".join(lines)


def train_tiny(ids: list[int], vocab_size: int, steps: int, seq: int = 128, batch: int = 16) -> Transformer:
    cfg = tiny()
    cfg.vocab_size = vocab_size
    torch.manual_seed(0)
    model = Transformer.from_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    for _ in range(steps):
        starts = torch.randint(len(data) - seq - 1, (batch,))
        x = torch.stack([data[s : s + seq] for s in starts])
        y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {steps} steps, final loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 6], help="speculative tokens")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup_threads(args.threads)
    print(machine_line())

    text = corpus(400, seed=0)
    tokenizer = train_bpe([text], vocab_size=320)
    trained = train_tiny(tokenizer.encode(text), tokenizer.vocab_size, args.steps)
    torch.manual_seed(1)
    untrained = Transformer.from_config(trained.cfg).eval()
    # prompts: three fresh lines of the same template, then let the model continue
    held_out = corpus(args.prompts * 3, seed=1).splitlines(keepends=True)
    prompts = [tokenizer.encode("".join(held_out[3 * i : 3 * i + 3])) for i in range(args.prompts)]

    rows = []
    for model_name, model in (("trained", trained), ("untrained", untrained)):
        for mode, params in (
            ("greedy", SamplingParams(temperature=0.0)),
            ("T=0.7", SamplingParams(temperature=0.7)),
        ):
            for k in args.k:
                stats = SpeculativeStats()
                start = time.perf_counter()
                for i, prompt in enumerate(prompts):
                    speculative_generate(
                        model, prompt, params, NgramProposer(1, 4, k), args.max_tokens,
                        generator=torch.Generator().manual_seed(i), stats=stats,
                    )  # fmt: skip
                rows.append(
                    [
                        model_name, mode, k, stats.num_proposed, f"{stats.acceptance_rate:.2f}",
                        f"{stats.tokens_per_step:.2f}", f"{time.perf_counter() - start:.1f}",
                    ]
                )  # fmt: skip
    print_table(["target", "sampling", "k", "proposed", "acceptance", "tokens/forward", "s"], rows)
    sample = speculative_generate(
        trained, prompts[0], SamplingParams(temperature=0.0), NgramProposer(1, 4, 4), 40
    )
    print("\ngreedy continuation of prompt 0:", repr(tokenizer.decode(sample)))


if __name__ == "__main__":
    main()
