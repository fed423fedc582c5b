"""Serving on 1 vs 2 processes of this machine (data-parallel attention + expert parallelism on
gloo, loopback), against what the planner predicts for each.

    python -m benchmarks.serve_distributed                    # ~3 min on 2 cores
    python -m benchmarks.serve_distributed --concurrent 1 8 --new-tokens 16 --budget-s 10
    python -m benchmarks.serve_distributed --layout tp2      # one group of 2 ranks splitting the heads

The model is benchmarks/decode.py's (seeded random Mixtral layout, fp32, 8 experts top-2). Both
engines are built once: the one-process engine (all cores) and a two-rank one
(`--data-parallel-size 2 --enable-expert-parallel`, cores / 2 threads per rank, each rank holding
4 of the 8 experts of every layer). For each concurrency C, C greedy requests of `--new-tokens`
tokens (EOS ignored) run to completion; rounds alternate between the two engines and the medians
are printed (tokens/s = C · new tokens / wall time). Their greedy tokens are compared first: the
two-rank engine must give the one-process tokens exactly.

Printed per C: tokens/s of each and their ratio; the expert exchange's share of the two-rank wall
time (rank 0's seconds inside the collectives / wall); the planner's memory-bound prediction
(plan/inference.engine_step_bytes: every rank streams its replicated weights, the touched experts
once, the KV cache; the ranks share the bandwidth the planner measured for this machine, its
`cpu` entry). Memory per rank: the
weights each rank holds (its tensors' storage, huge-page padding included) against
plan/inference.engine_layout's figure (parameter bytes), and the worker's resident set.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, print_table
from benchmarks.decode import add_model_args, build_model_dir, make_prompts, model_config
from moetron.infer.engine import LLMEngine
from moetron.infer.llm import LLM
from moetron.infer.sampling_params import SamplingParams
from moetron.plan.hardware import get_accelerator
from moetron.plan.inference import engine_layout, engine_step_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5, help="rounds per concurrency (at least 2)")
    p.add_argument("--budget-s", type=float, default=40.0, help="per concurrency; trims rounds")
    p.add_argument("--workdir", default=None, help="keep the model here and reuse it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="dp2-ep",
        help="the two-rank layout: data-parallel + expert-parallel, or one group of two tensor-parallel ranks",
    )  # fmt: skip
    return p.parse_args()


# The two-rank layouts (EngineConfig fields). The planner predicts dp2-ep only (engine_step_bytes).
LAYOUTS = {
    "dp2-ep": {"data_parallel_size": 2, "enable_expert_parallel": True},
    "tp2": {"tensor_parallel_size": 2},
}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    args = parse_args()
    print(machine_line())
    cfg = model_config(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="moetron-serve-dist-"))
    build_model_dir(cfg, workdir, args.seed, "f32")
    prompts = make_prompts(workdir, max(args.concurrent), args.prompt_len)
    threads = torch.get_num_threads()
    settings = {"max_num_seqs": max(args.concurrent), "max_model_len": args.prompt_len + args.new_tokens + 1}
    one = LLMEngine.from_pretrained(workdir, **settings)
    two = LLMEngine.from_pretrained(workdir, **LAYOUTS[args.layout], **settings)
    rank_threads = torch.get_num_threads()  # launch set this process's threads for rank 0
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def run(engine: object, count: int, num_threads: int) -> tuple[float, list[list[int]]]:
        torch.set_num_threads(num_threads)
        start = time.perf_counter()
        outputs = LLM(engine).generate(prompts[:count], params)
        return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]

    device = get_accelerator("cpu")  # the planner's entry for this machine (measured copy bandwidth)
    bandwidth = device.hbm_bytes_per_s
    print(
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s; one process: {threads} threads; two ranks: {rank_threads} each"
    )
    rows = []
    context = args.prompt_len + args.new_tokens // 2  # a sequence's mean length while decoding
    for count in args.concurrent:
        _, expected = run(one, count, threads)
        _, got = run(two, count, rank_threads)
        assert got == expected, f"C={count}: the two-rank engine's greedy tokens differ from one process's"
        times: dict[str, list[float]] = {"one": [], "two": []}
        exchange_before = two.get_stats().ranks[0].exchange_seconds_total
        start = time.perf_counter()
        for round_number in range(args.repeats):
            if round_number >= 2 and time.perf_counter() - start > args.budget_s:
                break
            times["one"].append(run(one, count, threads)[0])
            times["two"].append(run(two, count, rank_threads)[0])
        exchange = two.get_stats().ranks[0].exchange_seconds_total - exchange_before
        tokens = count * args.new_tokens
        speed = {name: tokens / statistics.median(ts) for name, ts in times.items()}
        predicted = {
            name: count / (engine_step_bytes(cfg, ranks, count, context, 4.0, 4) / bandwidth)
            for name, ranks in (("one", 1), ("two", 2))
        }
        if args.layout != "dp2-ep":
            predicted["two"] = float("nan")
        rows.append([
            count, f"{speed['one']:,.1f}", f"{speed['two']:,.1f}", f"{speed['two'] / speed['one']:.2f}x",
            f"{exchange / sum(times['two']):.0%}", f"{predicted['one']:,.0f}", f"{predicted['two']:,.0f}",
            f"{speed['one'] / predicted['one']:.2f} / {speed['two'] / predicted['two']:.2f}",
            len(times["one"]),
        ])  # fmt: skip
    torch.set_num_threads(threads)
    print(f"two ranks: {args.layout}")
    print_table(
        [
            "C", "1 proc tok/s", "2 ranks tok/s", "2 / 1", "rank 0 in the expert exchange", "predicted 1",
            "predicted 2", "measured / predicted (1 / 2)", "rounds",
        ],
        rows,
    )  # fmt: skip
    planned = engine_layout(cfg, device, 2, context, max(args.concurrent), "fp32", 4)
    ranks = two.get_stats().ranks
    worker_pid = two.workers[0].pid
    print_table(
        ["", "weights held", "planner's weights per rank", "resident set"],
        [
            ["1 process", f"{one.get_stats().weight_bytes / 2**20:,.1f} MiB", "", ""],
            *[
                [f"rank {r}", f"{s.weight_bytes / 2**20:,.1f} MiB",
                 f"{planned.weights_per_rank_bytes / 2**20:,.1f} MiB" if args.layout == "dp2-ep" else "",
                 f"{rss_bytes(worker_pid) / 2**20:,.0f} MiB" if r == 1 else "(with the 1-process engine)"]
                for r, s in enumerate(ranks)
            ],
        ],
    )  # fmt: skip
    two.shutdown()


if __name__ == "__main__":
    main()
