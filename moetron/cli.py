"""`moetron <command>`: the command-line entry point. Each command is a thin call into the package."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from moetron.config import PRESETS, ConfigError, ModelConfig, get_preset
from moetron.convert.hf import CheckpointError, from_pretrained, load_config
from moetron.model.accounting import forward_flops_per_token, kv_bytes_per_token, param_counts
from moetron.model.transformer import Transformer


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
        model.save_pretrained(tmp)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"moetron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
