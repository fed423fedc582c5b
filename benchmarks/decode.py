"""Decode speed on one set of weights (fp32; `--weights bf16`): moetron vs transformers vs llama.cpp.

    python -m benchmarks.decode                       # ~230M-param Mixtral, ~4 min on 2 cores
    python -m benchmarks.decode --num-layers 8 --new-tokens 128 --concurrent 64 --skip-llama-cpp

(a) Batch 1: one prompt, greedy, `--new-tokens` new tokens (EOS ignored) in each system.
    decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)): prefill and the first token
    cancel, so systems with different prefill speeds compare on the decode loop alone.
(b) `--concurrent` requests of `--concurrent-new-tokens` each: moetron's engine takes them all at
    once (continuous batching); transformers serves them one at a time (its `generate` has no
    scheduler). Total generated tokens / wall time.

Weights: moetron initialises a seeded random Mixtral-layout model and `save_pretrained`s it;
transformers loads that directory with `MixtralForCausalLM.from_pretrained`, llama.cpp the f32
GGUF that llama.cpp's own converter writes from it (`moetron.convert.gguf.export_gguf`). The
tokenizer is a SentencePiece model trained on the bundled Shakespeare (the converter accepts it);
every system is fed the same token ids, never text. Greedy tokens are compared before timing.

`--weights bf16`: the same seeded weights rounded to bf16 and saved as a bf16 checkpoint, the usual
Hugging Face format. moetron serves it in float32 from the bf16 weights (widened in its kernels),
transformers loads it in float32 (the same numbers, so greedy tokens must still match), llama.cpp
runs the bf16 GGUF its converter writes. The issue's targets, and the verdict lines, are for f32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    CpuMeter,
    hf_experts_default,
    hf_experts_options,
    machine_line,
    print_table,
    quiet_transformers,
    read_bandwidth_gbs,
    setup_threads,
    time_interleaved,
)
from moetron.config import ModelConfig, MoEConfig
from moetron.convert.hf import save_pretrained
from moetron.hardware import matmul_peak_flops
from moetron.model.accounting import forward_flops_per_token, kv_bytes_per_token, param_counts
from moetron.plan.hardware import measure_copy_bandwidth

Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, new tokens) -> new ids
TARGET_VS_LLAMA_CPP = 1.0  # batch-1 decode, moetron / llama.cpp f32 (issue 6)
TARGET_VS_HF_CONCURRENT = 10.0  # concurrent total tokens/s, moetron / transformers one at a time
WEIGHT_BYTES = {"f32": 4, "bf16": 2}
PROBE_TOKENS = 4  # new tokens per call when choosing transformers' experts implementation


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model's shape (model_config reads them); decode_quant.py shares it."""
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden-dim", type=int, default=2048)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt, (a) and (b)")
    p.add_argument("--new-tokens", type=int, default=64, help="(a): new tokens per generation")
    p.add_argument("--concurrent", type=int, default=32, help="(b): number of requests")
    p.add_argument("--concurrent-new-tokens", type=int, default=32, help="(b): new tokens per request")
    p.add_argument(
        "--hf-timed-requests", type=int, default=0,
        help="(b): transformers' timed calls serve this many of the requests one at a time (default 0: "
        "all of them; fewer is quicker but noisier). Its check pass serves all and is timed too",
    )  # fmt: skip
    p.add_argument(
        "--engine-option", action="append", default=[], metavar="KEY=VALUE",
        help="an EngineConfig field for moetron, e.g. batch_invariant=false (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--weights", choices=["f32", "bf16"], default="f32",
        help="checkpoint dtype (see above); the targets are for f32",
    )  # fmt: skip
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the model and GGUF here and reuse them")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0, help="per part; trims repeats (min 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--llama-threads", type=int, default=None,
        help="llama.cpp threads (default: --threads). Its workers spin at barriers: on a busy machine "
        "fewer threads than cores can be faster",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab_size, dim=args.dim, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, max_seq_len=max(512, args.prompt_len + args.new_tokens),
        moe=MoEConfig(
            num_experts=args.num_experts, top_k=args.top_k, expert_hidden_dim=args.expert_hidden_dim,
        ),
    )  # fmt: skip


# --- The model directory and the prompts -------------------------------------------------------


def build_model_dir(cfg: ModelConfig, directory: Path, seed: int, weights: str) -> None:
    """Seeded random weights (in `weights`: f32 or bf16) + a SentencePiece tokenizer, reused when
    `directory` already holds this config (a --workdir from an earlier run)."""
    config = directory / "config.json"
    if config.exists() and json.loads(config.read_text()).get("moetron") == cfg.to_dict():
        return
    from moetron.convert.gguf import write_sentencepiece_tokenizer
    from moetron.data.shakespeare import documents
    from moetron.model.transformer import Transformer

    write_sentencepiece_tokenizer(documents()[:300], cfg.vocab_size, directory)
    torch.manual_seed(seed)
    model = Transformer.from_config(cfg)
    save_pretrained(model.to(torch.bfloat16 if weights == "bf16" else torch.float32), directory)


def make_prompts(directory: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` ids: the opening of different Shakespeare passages."""
    import sentencepiece

    from moetron.data.shakespeare import documents

    spm = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    passages = documents()[300 :: max(1, 900 // count)]
    prompts = [ids[:length] for ids in spm.encode(passages) if len(ids) >= length][:count]
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} passages have {length} tokens; lower --prompt-len")
    return prompts


def export(directory: Path, gguf: Path, outtype: str) -> Path:
    from moetron.convert.gguf import export_gguf

    config = directory / "config.json"
    if not gguf.exists() or gguf.stat().st_mtime < config.stat().st_mtime:
        export_gguf(directory, gguf, outtype=outtype)
    return gguf


# --- One `Generate` per system ------------------------------------------------------------------


def moetron_generate(directory: Path, options: list[str]) -> Generate:
    """The engine's add_request/step loop: every prompt is queued, then steps run until all finish.
    Prefix caching is off: the timed calls repeat the same prompts, and neither transformers nor
    (reset before each call) llama.cpp reuses an earlier call's KV cache."""
    from moetron.infer.engine import LLMEngine
    from moetron.infer.sampling_params import SamplingParams

    # float32 named: a bf16 checkpoint then keeps bf16 weights on any CPU (the default only where
    # the CPU has no bf16 matmul), and is computed like transformers' float32 load of it.
    overrides: dict[str, object] = {"enable_prefix_caching": False, "dtype": "float32"}
    for option in options:
        key, _, value = option.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false, null
        except ValueError:
            overrides[key] = value  # a bare string such as float32
    engine = LLMEngine.from_pretrained(directory, **overrides)

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        ids = [engine.add_request(prompt, params) for prompt in prompts]
        done: dict[str, list[int]] = {}
        while len(done) < len(prompts):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return [done[i] for i in ids]

    return run


def hf_generate(directory: Path) -> tuple[torch.nn.Module, Generate]:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like the others (not min_new_tokens:
    model.generation_config.pad_token_id = 0  # that masks the EOS logit and changes greedy picks)

    @torch.no_grad()
    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        outs = []
        for prompt in prompts:  # one request at a time
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
            outs.append(out[0, len(prompt) :].tolist())
        return outs

    return model, run


def llama_cpp_generate(gguf: Path, n_ctx: int, threads: int) -> Generate:
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32  # KV cache too (its default is f16), as moetron's in fp32
    llm = llama_cpp.Llama(
        str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=False,
        type_k=f32, type_v=f32, verbose=False,
    )  # fmt: skip

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        outs = []
        for prompt in prompts:
            llm.reset()  # no KV reuse from the previous call: every run prefills
            ids: list[int] = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # EOS does not stop it
                ids.append(token)
                if len(ids) == new_tokens:
                    break
            outs.append(ids)
        return outs

    return run


def fastest_hf_impl(model: torch.nn.Module, run: Generate, prompt: list[int]) -> tuple[str, dict[str, float]]:
    """transformers' experts implementation that decodes fastest here (median of 4-token calls
    within a short budget: batched_mm copies each routed expert's weights per token, ~10x slower)."""

    def with_impl(impl: str) -> Callable[[], object]:
        def call() -> object:
            model.set_experts_implementation(impl)
            return run([prompt], PROBE_TOKENS)

        return call

    fns = {impl: with_impl(impl) for impl in hf_experts_options()}
    timings = time_interleaved(fns, warmup=1, repeats=3, budget_s=5, min_rounds=1)
    seconds = {impl: t.median_s for impl, t in timings.items()}
    best = min(seconds, key=seconds.get)
    model.set_experts_implementation(best)
    return best, seconds


# --- Checks, limits and reporting ----------------------------------------------------------------


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'identical', or how many sequences match and where the first mismatch is."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    if same == len(ours):
        return "identical"
    first = next(
        (i, next(j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y))
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        if a != b and any(x != y for x, y in zip(a, b, strict=False))
    )
    return f"{same}/{len(ours)} sequences identical; first difference: sequence {first[0]}, token {first[1]}"


def weight_bytes_per_token(cfg: ModelConfig, weight_bytes: int) -> int:
    """Weight bytes one decoded token reads: the active ones, of the embedding only its row."""
    counts = param_counts(cfg)
    return weight_bytes * (counts.active - counts.embedding + cfg.dim)


@dataclass
class Limits:
    """This machine's ceilings, measured at the start and again at the end, the better kept: one
    busy moment cannot fake a low ceiling."""

    read_gbs: float
    copy_gbs: float
    peak_flops: float  # fp32 matmul, moetron.hardware.matmul_peak_flops

    @classmethod
    def measure(cls) -> Limits:
        return cls(read_bandwidth_gbs(), measure_copy_bandwidth() / 1e9, matmul_peak_flops(torch.float32))

    def remeasure(self) -> None:
        self.read_gbs = max(self.read_gbs, read_bandwidth_gbs())
        self.copy_gbs = max(self.copy_gbs, measure_copy_bandwidth() / 1e9)
        self.peak_flops = max(self.peak_flops, matmul_peak_flops(torch.float32))

    def batch_one_bound(self, cfg: ModelConfig, args: argparse.Namespace) -> tuple[float, str]:
        """Tokens/s if every decoded token only streamed its weights and KV at read bandwidth."""
        context = args.prompt_len + args.new_tokens / 2  # mean tokens attended while decoding
        weights = weight_bytes_per_token(cfg, WEIGHT_BYTES[args.weights])
        kv = kv_bytes_per_token(cfg, 4) * context
        bound = self.read_gbs * 1e9 / (weights + kv)
        return bound, (
            f"batch-1 bandwidth bound: {self.read_gbs:.1f} GB/s / ({weights / 1e6:.0f} MB of active {args.weights} "
            f"weights + {kv / 1e6:.1f} MB KV per token) = {bound:.1f} tokens/s"
        )

    def concurrent_bound(self, cfg: ModelConfig, args: argparse.Namespace) -> tuple[float, str]:
        """Tokens/s of part (b) if every step only read its bytes at read bandwidth or only computed
        its FLOPs at the matmul peak, whichever takes longer. The run is one prefill step (all
        prompts; it also yields each request's first token) and then M - 1 decode steps of B rows.
        A step of B tokens reads once every expert some token picks (all of them once B >= E, for
        uniform routing) plus every sequence's KV."""
        batch, counts, moe = args.concurrent, param_counts(cfg), cfg.moe
        prompt, new = args.prompt_len, args.concurrent_new_tokens
        picked = moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** batch)
        dense = counts.total - counts.embedding - counts.routed_experts
        context = prompt + new / 2
        step_bytes = WEIGHT_BYTES[args.weights] * (dense + counts.routed_experts * picked / moe.num_experts)
        step_bytes += batch * kv_bytes_per_token(cfg, 4) * context
        read_s = step_bytes / (self.read_gbs * 1e9)
        prefill_s = max(read_s, batch * prompt * forward_flops_per_token(cfg, prompt // 2) / self.peak_flops)
        flops = forward_flops_per_token(cfg, int(context))
        step_s = max(read_s, batch * flops / self.peak_flops)
        bound = batch * new / (prefill_s + (new - 1) * step_s)
        return bound, (
            f"{batch}-request bound: prefill of {batch} x {prompt} tokens at the matmul peak ({prefill_s:.2f} s) "
            f"+ {new - 1} decode steps x max(bandwidth: {step_bytes / 1e6:.0f} MB / {self.read_gbs:.1f} GB/s, "
            f"compute: {batch} x {flops / 1e6:.0f} MFLOP / {self.peak_flops / 1e9:.0f} GFLOP/s) "
            f"({step_s * 1e3:.0f} ms) = {bound:.0f} tokens/s"
        )

    def line(self) -> str:
        return (
            f"memory bandwidth: read {self.read_gbs:.1f} GB/s (sum over 512 MiB), copy {self.copy_gbs:.1f} "
            f"GB/s (read+write); fp32 matmul peak {self.peak_flops / 1e9:.0f} GFLOP/s (1024^3)"
        )


def verdict(ratio: float, target: float) -> str:
    return f"{'meets' if ratio >= target else 'MISSES'} the >= {target:g}x target"


def main() -> None:
    args = parse_args()
    threads = setup_threads(args.threads)
    quiet_transformers()
    cfg = model_config(args)
    background = CpuMeter()
    print(machine_line())
    limits = Limits.measure()
    counts = param_counts(cfg)
    print(
        f"model: Mixtral layout, {cfg.num_layers} layers, dim {cfg.dim}, {cfg.moe.num_experts} experts "
        f"top-{cfg.moe.top_k} (width {cfg.moe.expert_hidden_dim}), {cfg.num_heads} heads / "
        f"{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}: {counts.total / 1e6:.0f}M params "
        f"({WEIGHT_BYTES[args.weights] * counts.total / 2**20:.0f} MiB {args.weights}), "
        f"{counts.active / 1e6:.0f}M active; random seeded weights"
    )
    use_llama = not args.skip_llama_cpp
    if use_llama and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama-cpp-python not installed (pip install -e '.[bench]'); its rows are skipped")
        use_llama = False
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moetron-decode-"))
    try:
        directory = workdir / ("model" if args.weights == "f32" else f"model-{args.weights}")
        start = time.perf_counter()
        build_model_dir(cfg, directory, args.seed, args.weights)
        gguf = export(directory, workdir / f"model-{args.weights}.gguf", args.weights) if use_llama else None
        print(
            f"model directory{f' + {args.weights} GGUF' if gguf else ''} ready in {time.perf_counter() - start:.0f} s"
        )
        prompts = make_prompts(directory, max(1, args.concurrent), args.prompt_len)
        systems, hf_name = load_systems(directory, gguf, args, prompts[0], threads)
        decode, rows_a = batch_one(systems, hf_name, prompts[0], args)
        ratio_b, rows_b = concurrent(systems, hf_name, prompts, args)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    limits.remeasure()
    bound, bound_line = limits.batch_one_bound(cfg, args)
    n, m = args.new_tokens, args.concurrent_new_tokens
    print(
        f"\n(a) batch 1: prompt {args.prompt_len} tokens, {n} new tokens, greedy, {args.weights} weights, "
        f"{threads} threads"
    )
    for row in rows_a:
        row.insert(2, f"{float(row[1]) / bound:.0%}")
    print_table(
        ["system", "decode tok/s", "% of bound", f"e2e tok/s ({n} new)", "n (N + 1)", "ours/this"], rows_a
    )
    bound_b, bound_b_line = limits.concurrent_bound(cfg, args)
    print(f"\n(b) {len(prompts)} requests x {m} new tokens, prompts of {args.prompt_len} tokens")
    for row in rows_b:
        row.insert(4, f"{float(row[3]) / bound_b:.0%}")
    print_table(["system", "requests timed", "served", "total tok/s", "% of bound", "n", "ours/this"], rows_b)
    print()
    print(limits.line())
    print(bound_line)
    print(bound_b_line)
    report(decode, ratio_b, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(background.line())


def load_systems(
    directory: Path, gguf: Path | None, args: argparse.Namespace, prompt: list[int], threads: int
) -> tuple[dict[str, Generate], str]:
    """{row name: Generate}, moetron first when its engine imports, and transformers' row name."""
    systems: dict[str, Generate] = {}
    try:
        systems["moetron"] = moetron_generate(directory, args.engine_option)
    except ImportError as e:  # the engine is not there yet: the other rows still run
        print(f"moetron engine unavailable ({e}); its rows are skipped")
    hf_model, hf_run = hf_generate(directory)
    impl, impl_s = fastest_hf_impl(hf_model, hf_run, prompt)
    default = hf_experts_default()
    print(
        "transformers experts implementation for decode: "
        + ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in impl_s.items())
        + f" per {PROBE_TOKENS} new tokens -> {impl!r}"
        + (" (its default)" if impl == default else f" (default: {default!r})")
    )
    hf_name = f"transformers {impl}"
    systems[hf_name] = hf_run
    if gguf is not None:
        n_ctx = args.prompt_len + args.new_tokens + 8
        systems[f"llama.cpp {args.weights}"] = llama_cpp_generate(gguf, n_ctx, args.llama_threads or threads)
    return systems, hf_name


def batch_one(
    systems: dict[str, Generate], hf_name: str, prompt: list[int], args: argparse.Namespace
) -> tuple[dict[str, float], list[list[object]]]:
    """Part (a): checks greedy tokens, then times N and 1 new tokens interleaved. Returns decode
    tokens/s per system and the table rows."""
    n = args.new_tokens
    outputs = {name: run([prompt], n) for name, run in systems.items()}  # check + warmup
    for name, out in outputs.items():
        if len(out[0]) != n:
            raise SystemExit(f"{name} generated {len(out[0])} tokens, not {n}")
    if len(outputs) > 1:
        print(f"(a) greedy tokens vs {hf_name}: " + "; ".join(
            f"{name} {agreement(out, outputs[hf_name])}" for name, out in outputs.items() if name != hf_name
        ))  # fmt: skip
    if "moetron" in outputs and outputs["moetron"] != outputs[hf_name]:
        raise SystemExit("moetron and transformers disagree on fp32 greedy tokens: not the same model")
    fns = {}
    for name, run in systems.items():
        fns[f"{name}|N"] = lambda run=run: run([prompt], n)
        fns[f"{name}|1"] = lambda run=run: run([prompt], 1)
    timings = time_interleaved(fns, warmup=0, repeats=args.repeats, budget_s=args.budget_s)
    decode = {}
    for name in systems:
        t_n, t_1 = timings[f"{name}|N"], timings[f"{name}|1"]
        decode[name] = (n - 1) / (t_n.median_s - t_1.median_s)
    rows = []
    for name in systems:
        t_n, t_1 = timings[f"{name}|N"], timings[f"{name}|1"]
        ours = f"{decode['moetron'] / decode[name]:.2f}" if "moetron" in decode else "-"
        rows.append(
            [name, f"{decode[name]:.1f}", f"{n / t_n.median_s:.1f}", f"{t_n.count} + {t_1.count}", ours]
        )
    return decode, rows


def concurrent(
    systems: dict[str, Generate], hf_name: str, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[float | None, list[list[object]]]:
    """Part (b): moetron serves all prompts at once, transformers one at a time. Returns the
    speed ratio (None without moetron) and the table rows."""
    m, k = args.concurrent_new_tokens, min(args.hf_timed_requests or len(prompts), len(prompts))
    hf = systems[hf_name]
    start = time.perf_counter()
    hf_all = hf(prompts, m)  # check pass over every request, timed once
    hf_all_rate = len(prompts) * m / (time.perf_counter() - start)
    fns: dict[str, Callable[[], object]] = {"transformers": lambda: hf(prompts[:k], m)}
    if "moetron" in systems:
        ours = systems["moetron"]
        print(f"(b) greedy tokens, {len(prompts)} requests: moetron {agreement(ours(prompts, m), hf_all)}")
        fns = {"moetron": lambda: ours(prompts, m), **fns}
    timings = time_interleaved(fns, warmup=0, repeats=args.repeats, budget_s=args.budget_s)
    hf_rate = k * m / timings["transformers"].median_s
    ours_rate = len(prompts) * m / timings["moetron"].median_s if "moetron" in timings else None

    def vs(rate: float) -> str:
        return f"{ours_rate / rate:.2f}" if ours_rate else "-"

    rows: list[list[object]] = []
    if ours_rate:
        rows.append(["moetron engine", len(prompts), "all at once", f"{ours_rate:.1f}", timings["moetron"].count, "1.00"])  # fmt: skip
    rows.append([hf_name, k, "one at a time", f"{hf_rate:.1f}", timings["transformers"].count, vs(hf_rate)])
    rows.append([f"{hf_name} (check pass)", len(prompts), "one at a time", f"{hf_all_rate:.1f}", "1/1", vs(hf_all_rate)])  # fmt: skip
    return (ours_rate / hf_rate if ours_rate else None), rows


def report(decode: dict[str, float], ratio_b: float | None, args: argparse.Namespace) -> None:
    if "moetron" not in decode:
        return
    for name, rate in decode.items():
        if name != "moetron":
            ratio = decode["moetron"] / rate
            judged = name == "llama.cpp f32" and args.weights == "f32"
            target = f"; {verdict(ratio, TARGET_VS_LLAMA_CPP)}" if judged else ""
            print(f"(a) batch-1 decode: moetron {ratio:.2f}x {name}{target}")
    if ratio_b is not None:
        target = f"; {verdict(ratio_b, TARGET_VS_HF_CONCURRENT)}" if args.weights == "f32" else ""
        print(f"(b) {args.concurrent} concurrent: moetron {ratio_b:.1f}x transformers one at a time{target}")


if __name__ == "__main__":
    main()
