"""Engine throughput with and without n-gram speculative decoding on repetitive prompts.

    python -m benchmarks.speculative_engine                 # ~1-2 min on 2 busy cores
    python -m benchmarks.speculative_engine --batch 1 8 --k 2 4

Trains the `tiny` preset briefly on templated text (benchmarks/speculative_acceptance.py), then
runs the same greedy requests through `LLMEngine` plain and with speculation (batch-invariant
kernels either way), checks the outputs are identical, and reports generated tokens/s, the
acceptance rate and the speedup. Each configuration runs --repeats times, interleaved, and reports
its median; on a shared machine absolute numbers drift, ratios less so. On a CPU a verify step of
1 + k rows costs nearly what one decode row costs only while the forward is overhead-bound: the
speedup shrinks as the batch grows.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import machine_line, print_table, setup_threads
from benchmarks.speculative_acceptance import corpus, train_tiny
from moetron.config import EngineConfig
from moetron.data.tokenizer import train_bpe
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    return [outs[i] for i in ids], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="requests at once")
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="speculative tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup_threads(args.threads)
    print(machine_line())

    text = corpus(400, seed=0)
    tokenizer = train_bpe([text], vocab_size=320)
    model = train_tiny(tokenizer.encode(text), tokenizer.vocab_size, args.steps)
    held_out = corpus(max(args.batch) * 3, seed=1).splitlines(keepends=True)
    all_prompts = [tokenizer.encode("".join(held_out[3 * i : 3 * i + 3])) for i in range(max(args.batch))]
    base = dict(num_kv_blocks=512, block_size=16, max_num_batched_tokens=1024)
    engines = {"plain": LLMEngine(model, tokenizer, EngineConfig(**base))}
    for k in args.k:
        engines[f"ngram k={k}"] = LLMEngine(
            model, tokenizer, EngineConfig(**base, speculative_method="ngram", num_speculative_tokens=k)
        )

    rows = []
    for batch in args.batch:
        prompts = all_prompts[:batch]
        times: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, list[list[int]]] = {}
        before = {name: e.get_stats() for name, e in engines.items()}
        for _ in range(args.repeats):  # interleaved: drift hits every engine alike
            for name, engine in engines.items():
                outputs[name], seconds = generate(engine, prompts, args.max_tokens)
                times[name].append(seconds)
        plain_s = statistics.median(times["plain"])
        for name, engine in engines.items():
            assert outputs[name] == outputs["plain"], f"{name}: output differs from plain decoding"
            stats = engine.get_stats()
            proposed = stats.spec_proposed_tokens_total - before[name].spec_proposed_tokens_total
            accepted = stats.spec_accepted_tokens_total - before[name].spec_accepted_tokens_total
            seconds = statistics.median(times[name])
            tokens = sum(len(o) for o in outputs[name])
            rows.append(
                [
                    name, batch, tokens, f"{tokens / seconds:.1f}",
                    f"{accepted / proposed:.2f}" if proposed else "-", f"{plain_s / seconds:.2f}x",
                ]
            )  # fmt: skip
    print_table(["engine", "batch", "tokens", "tokens/s", "acceptance", "speedup"], rows)
    print(
        "(greedy; outputs checked identical to plain decoding; medians of interleaved repeats, noisy machine)"
    )


if __name__ == "__main__":
    main()
