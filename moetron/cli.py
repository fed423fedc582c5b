"""`moetron <command>`: the command-line entry point. Each command is a thin call into the package."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from moetron.config import PRESETS, ConfigError, EngineConfig, ModelConfig, get_preset, load_run_config
from moetron.convert.hf import CheckpointError, from_pretrained, load_config, save_pretrained
from moetron.data.errors import DataError
from moetron.model.accounting import forward_flops_per_token, kv_bytes_per_token, param_counts
from moetron.model.transformer import Transformer
from moetron.train.checkpoint import CheckpointSaveError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _summary_row(name: str, cfg: ModelConfig) -> str:
    counts = param_counts(cfg)
    attention = "MHA" if cfg.num_kv_heads == cfg.num_heads else ("MQA" if cfg.num_kv_heads == 1 else "GQA")
    return (
        f"{name:<14}{cfg.num_layers:>7}{cfg.dim:>8}{cfg.moe.num_experts:>9}{cfg.moe.top_k:>7}  {attention:<5}"
        f"{_human(counts.total):>10}{_human(counts.active):>10}"
        f"{_human(forward_flops_per_token(cfg, cfg.max_seq_len)):>14}{kv_bytes_per_token(cfg):>12,}"
    )


SUMMARY_HEADER = (
    f"{'model':<14}{'layers':>7}{'dim':>8}{'experts':>9}{'top-k':>7}  {'attn':<5}"
    f"{'total':>10}{'active':>10}{'fwd FLOP/tok':>14}{'KV B/tok':>12}"
)


def cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = get_preset("tiny")
    print(f"[1/3] building the 'tiny' MoE transformer on the meta device, then initialising on {args.device}")
    model = Transformer.from_config(cfg, device=args.device).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (2, 32), device=args.device)
    with torch.no_grad():
        model(input_ids)  # warm-up: first calls initialise the math libraries
        for layer in model.moe_layers():
            layer.tokens_per_expert.zero_()
        start = time.perf_counter()
        logits = model(input_ids)
    elapsed = time.perf_counter() - start
    print(
        f"      forward {tuple(input_ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype} in {elapsed * 1e3:.1f} ms"
    )
    loads = [layer.tokens_per_expert.tolist() for layer in model.moe_layers()]
    print(f"      tokens routed per expert, per layer: {loads}")

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        reloaded = from_pretrained(tmp)
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids.cpu()), logits.cpu())
        files = sorted(p.name for p in Path(tmp).iterdir())
    print(f"[2/3] saved as a Hugging Face Mixtral directory {files}; reloaded logits identical: {same}")

    print("[3/3] parameter counts of every preset (model/accounting.py):")
    print("      " + SUMMARY_HEADER)
    for name in PRESETS:
        print("      " + _summary_row(name, get_preset(name)))
    return 0 if same else 1


def cmd_info(args: argparse.Namespace) -> int:
    cfg = get_preset(args.model) if args.model in PRESETS else load_config(args.model)
    print(SUMMARY_HEADER)
    print(_summary_row(Path(args.model).name, cfg))
    counts = param_counts(cfg)
    for field in (
        "embedding",
        "output",
        "attention",
        "router",
        "routed_experts",
        "shared_experts",
        "dense_ffn",
    ):
        print(f"  {field:<16}{getattr(counts, field):>20,}")
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from moetron.train.trainer import train

    cfg = load_run_config(args.config, overrides)
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports (and samples)
    print(
        f"[train] done: {result.last_step} steps, validation loss {result.val_loss:.4f} "
        f"(perplexity {math.exp(result.val_loss):.2f}, {result.val_bpb:.3f} bits per byte); "
        f"model in {result.final_dir}"
    )
    if args.sample:
        _print_sample(result.final_dir, args.sample, max_tokens=80, temperature=0.8, top_p=0.95, seed=0)
    return 0


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from moetron.finetune.trainer import finetune

    if wrong := [o for o in overrides if not o.startswith("--finetune.")]:
        raise ConfigError(f"`moetron finetune` takes --finetune.key=value settings, not {wrong}")
    flags = [
        f"--finetune.{k}={v}"
        for k in ("base", "data", "method", "out_dir")
        if (v := getattr(args, k)) is not None
    ]
    if args.merge:
        flags.append("--finetune.merge=true")
    cfg = load_run_config(args.config, [*overrides, *flags]).finetune
    result = finetune(cfg)
    evaluated = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"[finetune] done: {result.step} steps{evaluated}; {cfg.method} output in {result.output_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from moetron.data import prepare

    cfg = load_run_config(args.config, overrides)
    data = prepare(cfg.data, seed=cfg.train.seed, progress=True)
    print(
        f"[prepare] {data.dir}: {data.num_train_tokens:,} train / {data.num_val_tokens:,} validation tokens, "
        f"{data.num_train_docs:,} / {data.num_val_docs:,} documents, vocabulary {data.vocab_size:,}"
    )
    return 0


def _print_sample(model_dir: Path, prompt: str, max_tokens: int, **sampling) -> None:
    from moetron.infer.llm import LLM
    from moetron.infer.sampling_params import SamplingParams

    SamplingParams(max_tokens=max_tokens, **sampling)  # bad values fail before the model loads
    llm = LLM(model_dir, max_num_seqs=1)
    if llm.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json")
    room = llm.engine.max_model_len - len(llm.tokenizer.encode(prompt))
    params = SamplingParams(max_tokens=max(1, min(max_tokens, room)), **sampling)
    print(prompt, end="", flush=True)
    print(llm.generate([prompt], params)[0].outputs[0].text, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    _print_sample(
        Path(args.model),
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return _eval_tasks(args)
    if args.data is None:
        raise ValueError("`moetron eval` needs --data FILE (loss and perplexity) or --tasks (lm-eval)")
    from moetron.data import load_tokenizer, read_documents
    from moetron.train.evaluate import evaluate_documents

    model, tokenizer = from_pretrained(args.model, dtype=torch.float32), load_tokenizer(args.model)
    if args.quantization:
        from moetron.quant.quantize import quantize_model

        print(f"[eval] {quantize_model(model, args.quantization).summary()}")
    documents = read_documents([args.data], text_field=args.text_field)
    seq_len = min(args.seq_len, model.cfg.max_seq_len)
    loss, num_tokens = evaluate_documents(
        model, tokenizer, documents, seq_len, args.batch_size, args.max_tokens
    )
    print(
        f"[eval] {args.data}: {num_tokens:,} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}"
    )
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    from moetron.eval import harness

    try:
        results = harness.run_tasks(
            args.model,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            engine_overrides={"quantization": args.quantization} if args.quantization else None,
        )
    except harness.MissingExtraError as e:
        print(f"moetron: error: {e}", file=sys.stderr)
        return 2
    print(harness.results_table(results))
    if args.output_path:
        harness.write_results(results, args.output_path)
        print(f"[eval] results written to {args.output_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moetron.convert.gguf_file import write_gguf
    from moetron.data import load_tokenizer

    model, tokenizer = from_pretrained(args.model, dtype=torch.float32), load_tokenizer(args.model)
    path = write_gguf(model, tokenizer, args.out, outtype=args.outtype)
    print(
        f"[export] {path}: {args.outtype}, {path.stat().st_size / 2**20:.1f} MiB (llama.cpp and `moetron serve` read it)"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moetron.convert.hf import save_pretrained
    from moetron.data import load_tokenizer
    from moetron.data.errors import DataError
    from moetron.finetune.lora import merge_lora
    from moetron.finetune.peft_format import load_adapter

    model = from_pretrained(args.base)
    cfg = load_adapter(model, args.adapter)
    merge_lora(model)
    save_pretrained(model, args.out)
    with contextlib.suppress(DataError):  # a base without a tokenizer: the merged directory has none
        load_tokenizer(args.base).save(args.out)
    print(f"[merge] {args.out}: {args.base} + {args.adapter} (LoRA r={cfg.rank}, {', '.join(cfg.targets)})")
    return 0


# `moetron serve` flags that set EngineConfig fields (dashes for underscores).
ENGINE_FLAGS = (
    "max_model_len",
    "max_num_seqs",
    "num_kv_blocks",
    "dtype",
    "quantization",
    "kv_cache_dtype",
    "device",
    "speculative_method",
    "num_speculative_tokens",
    "draft_model_dir",
    "data_parallel_size",
    "enable_expert_parallel",
    "tensor_parallel_size",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "lora_modules",
    "max_loras",
)


def serve_engine_config(args: argparse.Namespace, overrides: list[str]) -> EngineConfig:
    """defaults < the --config TOML's [engine] table < --engine.key=value < the named flags."""
    if wrong := [o for o in overrides if not o.startswith("--engine.")]:
        raise ConfigError(f"`moetron serve` takes --engine.key=value settings, not {wrong}")
    flags = [
        f"--engine.{k}={_override_value(v)}" for k in ENGINE_FLAGS if (v := getattr(args, k)) is not None
    ]
    return load_run_config(args.config, [*overrides, *flags]).engine


def _override_value(value: object) -> str:
    """A flag's value as an --engine.key=value override reads it (TOML literals)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return str(value)


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from moetron.serve.server import serve

    engine = serve_engine_config(args, overrides)
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("MOETRON_API_KEY") or None,
        served_model_name=args.served_model_name,
        max_queued_requests=args.max_queued_requests,
        log_level=args.log_level,
        engine_overrides=dataclasses.asdict(engine),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="build the tiny model, run it, round-trip it through HF format, list presets"
    )
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="parameter counts of a preset or a model directory")
    info.add_argument("model", help=f"preset ({', '.join(PRESETS)}) or Hugging Face model directory")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train per a TOML config; --section.key=value overrides any setting")
    train.add_argument("config", nargs="?", help="run config TOML (defaults apply when omitted)")
    train.add_argument("--sample", default="", help="after training, print a sample continuing this prompt")
    train.set_defaults(func=cmd_train, takes_overrides=True)
    prep = sub.add_parser("prepare", help="tokenize the configured data into token shards")
    prep.add_argument("config", nargs="?", help="run config TOML")
    prep.set_defaults(func=cmd_prepare, takes_overrides=True)

    gen = sub.add_parser("generate", help="sample a continuation from a model directory")
    gen.add_argument("model", help="Hugging Face model directory (with tokenizer)")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "eval",
        help="loss and perplexity on a text/JSONL/Parquet file (--data), or lm-evaluation-harness tasks "
        "run through moetron's own server (--tasks)",
    )
    ev.add_argument("model", help="Hugging Face model directory (with tokenizer)")
    ev.add_argument("--data", default=None, help="file or directory of .txt/.jsonl/.parquet")
    ev.add_argument(
        "--tasks", default=None,
        help="comma-separated lm-eval tasks (bundled: moetron_next_line, moetron_next_line_gen); "
        "needs pip install 'moetron[eval]'",
    )  # fmt: skip
    ev.add_argument(
        "--limit", type=float, default=None, help="--tasks: at most N documents per task (a fraction if < 1)"
    )
    ev.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples")
    ev.add_argument("--output-path", default=None, help="--tasks: also write the results as JSON here")
    ev.add_argument("--text-field", default="text")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per batch (--tasks: per request)")
    ev.add_argument("--max-tokens", type=int, default=200_000, help="evaluate at most this many tokens")
    ev.add_argument(
        "--quantization", default=None, choices=["q8_0", "q4_0", "q4_k"],
        help="evaluate the model with its matmul weights quantized as `moetron serve --quantization` does",
    )  # fmt: skip
    ev.set_defaults(func=cmd_eval)

    exp = sub.add_parser("export", help="write a model directory in another format: gguf (llama.cpp's)")
    exp.add_argument("format", choices=["gguf"])
    exp.add_argument("model", help="Hugging Face model directory (with tokenizer)")
    exp.add_argument("out", help="the file to write (replaced atomically)")
    exp.add_argument("--outtype", default="f32", choices=["f32", "bf16", "q8_0", "q4_0", "q4_k"])
    exp.set_defaults(func=cmd_export)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model directory on JSONL (SFT full / LoRA, or DPO); --finetune.key=value sets any setting",
    )
    ft.add_argument("base", nargs="?", default=None, help="the base model directory (or finetune.base)")
    ft.add_argument(
        "--data", default=None, help="JSONL: messages, prompt/completion, or prompt/chosen/rejected"
    )
    ft.add_argument("--method", default=None, choices=["full", "lora", "dpo"])
    ft.add_argument("--out", dest="out_dir", default=None, help="output directory (default runs/finetune)")
    ft.add_argument("--merge", action="store_true", help="LoRA: also write the merged model to OUT/merged")
    ft.add_argument("--config", default=None, help="a TOML file whose [finetune] table sets the run")
    ft.set_defaults(func=cmd_finetune, takes_overrides=True)

    mrg = sub.add_parser(
        "merge", help="fold a LoRA adapter (PEFT format) into its base: a plain HF directory"
    )
    mrg.add_argument("base", help="the base model directory")
    mrg.add_argument(
        "adapter", help="the adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    mrg.add_argument("out", help="the merged model directory to write")
    mrg.set_defaults(func=cmd_merge)

    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server for a model directory or GGUF file; --engine.key=value sets any engine setting",
    )
    srv.add_argument("model", help="Hugging Face model directory (with tokenizer) or GGUF file")
    srv.add_argument("--config", default=None, help="a TOML file whose [engine] table sets the engine")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key", default=None, help="require Authorization: Bearer KEY (or set MOETRON_API_KEY)"
    )
    srv.add_argument(
        "--served-model-name", default=None, help="the model id clients use (default: directory name)"
    )
    srv.add_argument(
        "--max-queued-requests", type=int, default=None, help="beyond this many requests in flight, 429"
    )
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)"
    )
    srv.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched in one engine step")
    srv.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache pool size in blocks")
    srv.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"],
        help="activations and KV cache; default: the checkpoint's, but float32 for a bf16/fp16 "
        "checkpoint on a CPU without half-precision matmul instructions (bf16 weights then stay bf16)",
    )  # fmt: skip
    srv.add_argument(
        "--quantization", default=None, choices=["q8_0", "q4_0", "q4_k"],
        help="quantize the matmul weights at load to this GGML block format (CPU; int8 kernels)",
    )  # fmt: skip
    srv.add_argument(
        "--kv-cache-dtype", default=None, choices=["auto", "float32", "bfloat16"],
        help="the KV cache's dtype (auto: the activations'); bfloat16 holds twice the tokens",
    )  # fmt: skip
    srv.add_argument("--device", default=None, help="cpu, cuda, ... (default: the engine's)")
    srv.add_argument(
        "--speculative-method", default=None, choices=["ngram", "draft"], help="speculative decoding"
    )
    srv.add_argument("--num-speculative-tokens", type=int, default=None, help="draft tokens per step")
    srv.add_argument("--draft-model-dir", default=None, help="draft model for --speculative-method=draft")
    par = srv.add_argument_group(
        "serving across processes",
        "attention data-parallel (each rank its own requests and KV cache), experts sharded with "
        "--enable-expert-parallel; one node starts its ranks itself, several nodes each run the same "
        "command with --node-rank (or every rank runs under torchrun); only rank 0 listens on HTTP",
    )
    par.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=None,
        help="groups of ranks, each with its own requests",
    )
    par.add_argument(
        "--enable-expert-parallel", "-ep", action="store_const", const=True, default=None,
        help="each rank holds num_experts / ranks of every MoE layer's experts",
    )  # fmt: skip
    par.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=None,
        help="ranks per data-parallel group, splitting its attention heads and KV cache (not over one KV head: MQA)",
    )  # fmt: skip
    par.add_argument("--nnodes", type=int, default=None, help="nodes, each running this command")
    par.add_argument("--node-rank", type=int, default=None, help="this node's index (node 0 serves HTTP)")
    par.add_argument("--master-addr", default=None, help="node 0's address for the ranks' rendezvous")
    par.add_argument("--master-port", type=int, default=None, help="its port (default: a free one, one node)")
    srv.add_argument(
        "--lora-modules", nargs="+", default=None, metavar="NAME=ADAPTER_DIR",
        help="LoRA adapters (PEFT format) served per request: a request whose model is NAME runs that adapter",
    )  # fmt: skip
    srv.add_argument("--max-loras", type=int, default=None, help="at most this many adapters (default 8)")
    srv.set_defaults(func=cmd_serve, takes_overrides=True)

    from moetron.plan.cli import add_plan_parser

    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    if getattr(args, "takes_overrides", False):
        if unknown := [a for a in extra if a not in overrides]:
            parser.error(f"unrecognized arguments {unknown}; settings are given as --section.key=value")
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, overrides) if getattr(args, "takes_overrides", False) else args.func(args)
    except (ConfigError, CheckpointError, DataError, CheckpointSaveError, ValueError) as e:
        print(f"moetron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
