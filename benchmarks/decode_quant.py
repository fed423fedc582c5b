"""Decode speed per weight format, moetron vs llama.cpp on the same GGUF file (issue 15).

    python -m benchmarks.decode_quant                         # ~230M-param Mixtral, ~6 min on 2 cores
    python -m benchmarks.decode_quant --formats q8_0,q4_0 --num-layers 2
    python -m benchmarks.decode_quant --formats q4_k,llama_q4_k_m   # + a file llama.cpp quantized

For each format (f32, q8_0, q4_0, q4_k) moetron's writer (moetron/convert/gguf_file.py) writes one
GGUF of the same seeded weights; `llama_q4_k_m` (or llama_q8_0, llama_q4_0) is instead what
llama.cpp's own quantizer (llama_model_quantize) makes of the f32 file: the mix of formats users
download (for an 8-expert MoE's Q4_K_M: Q4_K, Q5_K, Q6_K and Q8_0). `moetron serve FILE.gguf`'s engine and llama.cpp
(llama-cpp-python, fp32 KV cache like moetron's) decode from that file:

(a) batch 1, greedy: decode tokens/s = (N - 1) / (t(N new) - t(1 new)), every system and format
    timed in interleaved rounds (medians), against the bandwidth bound of that format's bytes per
    token (active weights + KV at the measured read bandwidth);
(b) moetron's engine with `--concurrent` requests at once, per format, against the same bound for
    a step that reads every expert some token picks.

Both systems get the same token ids (moetron's BPE, trained on the bundled Shakespeare); greedy
tokens are compared before timing. The model shape is benchmarks/decode.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, print_table, read_bandwidth_gbs, setup_threads, time_interleaved
from benchmarks.decode import add_model_args, agreement, llama_cpp_generate, model_config, moetron_generate
from moetron.model.accounting import kv_bytes_per_token, param_counts

FORMATS = ("f32", "q8_0", "q4_0", "q4_k")
LLAMA_FTYPES = {"llama_q8_0": 7, "llama_q4_0": 2, "llama_q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=32, help="(b)'s requests; 0 skips (b)")
    p.add_argument("--concurrent-new-tokens", type=int, default=16)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=40.0, help="per part; trims repeats (min 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_files(
    args: argparse.Namespace, workdir: Path, formats: list[str]
) -> tuple[dict[str, Path], list[list[int]]]:
    """One GGUF per format from the same seeded weights, and the prompts (token ids)."""
    from moetron.convert.gguf_file import write_gguf
    from moetron.data.shakespeare import documents
    from moetron.data.tokenizer import train_bpe
    from moetron.model.transformer import Transformer

    cfg = model_config(args)
    texts = documents()
    tokenizer = train_bpe(texts[:300], cfg.vocab_size)
    torch.manual_seed(args.seed)
    model = Transformer.from_config(cfg).eval()
    ours = [fmt for fmt in formats if fmt not in LLAMA_FTYPES]
    if len(ours) < len(formats) and "f32" not in ours:
        ours.append("f32")  # llama.cpp quantizes from it
    files = {fmt: write_gguf(model, tokenizer, workdir / f"model-{fmt}.gguf", fmt) for fmt in ours}
    for fmt in formats:
        if fmt in LLAMA_FTYPES:
            files[fmt] = llama_quantize(files["f32"], workdir / f"model-{fmt}.gguf", LLAMA_FTYPES[fmt])
    files = {fmt: files[fmt] for fmt in formats}
    count = max(1, args.concurrent)
    prompts = [
        ids[: args.prompt_len] for ids in tokenizer.encode_batch(texts[300:]) if len(ids) >= args.prompt_len
    ]
    return files, prompts[:count]


def llama_quantize(source: Path, target: Path, ftype: int) -> Path:
    """`source` quantized by llama.cpp's own quantizer (its choice of format per tensor)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} (ftype {ftype})")
    return target


def bytes_per_weight(path: Path, cfg: object) -> float:
    """The file's bytes per parameter (the matmul weights dominate; norms and routers are F32)."""
    return path.stat().st_size / param_counts(cfg).total


def main() -> None:
    args = parse_args()
    threads = setup_threads(args.threads)
    formats = [f for f in args.formats.split(",") if f]
    cfg = model_config(args)
    print(machine_line())
    read_gbs = read_bandwidth_gbs()
    use_llama = not args.skip_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    if any(fmt in LLAMA_FTYPES for fmt in formats) and importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama_* formats are made by llama.cpp's quantizer: pip install -e '.[bench]'")
    counts = param_counts(cfg)
    print(
        f"model: Mixtral layout, {cfg.num_layers} layers, dim {cfg.dim}, {cfg.moe.num_experts} experts top-"
        f"{cfg.moe.top_k} (width {cfg.moe.expert_hidden_dim}), {cfg.num_heads}/{cfg.num_kv_heads} heads: "
        f"{counts.total / 1e6:.0f}M params, {counts.active / 1e6:.0f}M active"
    )
    workdir = Path(tempfile.mkdtemp(prefix="moetron-decode-quant-"))
    try:
        start = time.perf_counter()
        files, prompts = build_files(args, workdir, formats)
        per_weight = {fmt: bytes_per_weight(path, cfg) for fmt, path in files.items()}
        print(f"GGUF files ({', '.join(formats)}) written by moetron in {time.perf_counter() - start:.0f} s")
        systems = {}
        for fmt, path in files.items():
            systems[f"moetron {fmt}"] = moetron_generate(path, [])
            if use_llama:
                n_ctx = args.prompt_len + max(args.new_tokens, args.concurrent_new_tokens) + 8
                systems[f"llama.cpp {fmt}"] = llama_cpp_generate(path, n_ctx, threads)
        rates, rows = batch_one(systems, prompts[0], args)
        concurrent_rows = concurrent(systems, prompts, args, formats) if args.concurrent else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    read_gbs = max(read_gbs, read_bandwidth_gbs())
    context = args.prompt_len + args.new_tokens / 2
    kv = kv_bytes_per_token(cfg, 4) * context
    table = []
    for fmt in formats:
        weights = per_weight[fmt] * (counts.active - counts.embedding + cfg.dim)
        bound = read_gbs * 1e9 / (weights + kv)
        for system in ("moetron", "llama.cpp"):
            name = f"{system} {fmt}"
            if name in rates:
                ours = rates[f"moetron {fmt}"] / rates[name]
                table.append([name, f"{per_weight[fmt]:.2f}", f"{rates[name]:.1f}", f"{rates[name] / bound:.0%}", rows[name], f"{ours:.2f}"])  # fmt: skip
    n = args.new_tokens
    print(f"\n(a) batch 1: prompt {args.prompt_len} tokens, {n} new tokens, greedy, {threads} threads")
    print_table(["system", "bytes/weight", "decode tok/s", "% of bound", "n (N + 1)", "moetron/this"], table)
    print(
        f"bound: {read_gbs:.1f} GB/s read bandwidth / (active weight bytes at the format + {kv / 1e6:.1f} MB KV)"
    )
    if concurrent_rows:  # --concurrent 0 skips it
        print(
            f"\n(b) moetron engine, {args.concurrent} requests x {args.concurrent_new_tokens} new tokens at once"
        )
        print_table(["format", "total tok/s", "n"], concurrent_rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def batch_one(
    systems: dict, prompt: list[int], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, str]]:
    n = args.new_tokens
    outputs = {name: run([prompt], n) for name, run in systems.items()}
    for name, out in outputs.items():
        if name.startswith("llama.cpp"):
            ours = outputs[name.replace("llama.cpp", "moetron")]
            print(f"greedy tokens, {name.split()[1]}: moetron vs llama.cpp {agreement(ours, out)}")
    fns = {}
    for name, run in systems.items():
        fns[f"{name}|N"] = lambda run=run: run([prompt], n)
        fns[f"{name}|1"] = lambda run=run: run([prompt], 1)
    timings = time_interleaved(fns, warmup=0, repeats=args.repeats, budget_s=args.budget_s)
    rates, counts = {}, {}
    for name in systems:
        t_n, t_1 = timings[f"{name}|N"], timings[f"{name}|1"]
        rates[name] = (n - 1) / (t_n.median_s - t_1.median_s)
        counts[name] = f"{t_n.count} + {t_1.count}"
    return rates, counts


def concurrent(
    systems: dict, prompts: list[list[int]], args: argparse.Namespace, formats: list[str]
) -> list[list[object]]:
    m = args.concurrent_new_tokens
    fns = {fmt: (lambda run=systems[f"moetron {fmt}"]: run(prompts, m)) for fmt in formats}
    timings = time_interleaved(fns, warmup=1, repeats=args.repeats, budget_s=args.budget_s)
    return [[fmt, f"{len(prompts) * m / timings[fmt].median_s:.1f}", timings[fmt].count] for fmt in formats]


if __name__ == "__main__":
    main()
