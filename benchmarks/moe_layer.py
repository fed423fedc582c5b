"""One MoE layer, moetron vs transformers' MixtralSparseMoeBlock, on identical weights.

    python -m benchmarks.moe_layer                     # small preset shape, 4096 tokens, fp32 + bf16
    python -m benchmarks.moe_layer --tokens 1024 --dtypes fp32 --threads 1

Forward is timed under no_grad; forward+backward feeds a fixed dense output gradient and
includes zeroing the parameter gradients. FLOPs come from moetron.model.accounting (router +
top_k experts per token, backward = 2x forward).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    DTYPES,
    CpuMeter,
    PeakShare,
    batched_mm_bytes,
    hf_experts_default,
    hf_experts_options,
    machine_line,
    max_abs_diff,
    measure_peaks,
    mixtral_config,
    peak_line,
    print_summary,
    print_table,
    quiet_transformers,
    setup_threads,
    time_interleaved,
)
from moetron.config import ModelConfig, MoEConfig
from moetron.model.accounting import param_counts
from moetron.model.moe import MoELayer

FP32_TOLERANCE = 1e-4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden-dim", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--hf-impls", nargs="+", default=None, help="default: every CPU-capable one")
    p.add_argument("--max-batched-mm-gib", type=float, default=4.0, help="skip batched_mm above this")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0, help="per table cell group; trims repeats")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def layer_config(args: argparse.Namespace) -> ModelConfig:
    # One layer, so accounting's per-model counts are per-layer counts. Router losses off: the
    # HF block has none (Mixtral computes its aux loss in the CausalLM head, not the block).
    return ModelConfig(
        vocab_size=256, dim=args.dim, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64,
        moe=MoEConfig(
            num_experts=args.num_experts, top_k=args.top_k, expert_hidden_dim=args.expert_hidden_dim,
            aux_loss_weight=0.0, z_loss_weight=0.0,
        ),
    )  # fmt: skip


def forward_flops(cfg: ModelConfig, num_tokens: int) -> float:
    counts = param_counts(cfg)
    return 2 * num_tokens * (counts.router + counts.active_routed_experts + counts.shared_experts)


def hf_block(cfg: ModelConfig, ours: MoELayer, impl: str, dtype: torch.dtype) -> nn.Module:
    """transformers' Mixtral MoE block with `impl` experts and our layer's weights. It is taken
    from a one-layer MixtralForCausalLM so the experts dispatch is configured as in a real model."""
    from transformers import MixtralForCausalLM

    block = MixtralForCausalLM(mixtral_config(cfg, impl)).model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        block.experts.down_proj.copy_(ours.experts.w2)
    return block.to(dtype).train()


def forward_only(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    @torch.no_grad()
    def step() -> torch.Tensor:
        return layer(x)

    return step


def forward_backward(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_y)
        return x.grad

    return step


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    quiet_transformers()
    torch.manual_seed(args.seed)
    cfg = layer_config(args)
    background = CpuMeter()
    print(machine_line())
    peaks = measure_peaks(["fp32", "bf16"])
    print(peak_line(peaks))
    default_impl = hf_experts_default()
    impls = args.hf_impls or hf_experts_options()
    print(
        f"MoE layer: {args.tokens} tokens, dim {cfg.dim}, {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, "
        f"expert_hidden_dim {cfg.moe.expert_hidden_dim}. transformers' default experts implementation "
        f"here: {default_impl!r}; timing {impls}"
    )
    flops = {"fwd": forward_flops(cfg, args.tokens)}
    flops["fwd+bwd"] = 3 * flops["fwd"]

    rows, summary = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours_fp32 = MoELayer(cfg)
        ours_fp32.init_weights(cfg.init_std, cfg.init_std)
        ours = copy.deepcopy(ours_fp32).to(dtype).train()
        x = torch.randn(1, args.tokens, cfg.dim, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(1, args.tokens, cfg.dim, dtype=dtype)
        candidates = {
            "fwd": {"moetron": forward_only(ours, x)},
            "fwd+bwd": {"moetron": forward_backward(ours, x, grad_y)},
        }
        reference = candidates["fwd"]["moetron"]()
        reference_grad = candidates["fwd+bwd"]["moetron"]().clone()

        for impl in impls:
            name = f"HF {impl}" + (" (default)" if impl == default_impl else "")
            if impl == "batched_mm":
                need_gib = batched_mm_bytes(args.tokens, cfg, dtype) / 2**30
                if need_gib > args.max_batched_mm_gib:
                    print(
                        f"  [{dtype_name}] {name}: not timed, it gathers every routed pair's expert "
                        f"weights: {need_gib:.0f} GiB here (> --max-batched-mm-gib {args.max_batched_mm_gib})"
                    )
                    continue
            block = hf_block(cfg, ours_fp32, impl, dtype)
            fwd, fwd_bwd = forward_only(block, x), forward_backward(block, x, grad_y)
            diff = max_abs_diff(fwd(), reference)
            print(f"  [{dtype_name}] {name}: max |ours - HF| output {diff:.1e}", end="")
            if dtype == torch.float32 and diff > FP32_TOLERANCE:
                raise SystemExit(
                    f"\nfp32 outputs differ by {diff:.1e} > {FP32_TOLERANCE}: not the same layer"
                )
            candidates["fwd"][name] = fwd
            try:
                grad = fwd_bwd()
            except RuntimeError as e:  # e.g. a CPU grouped_mm backward that cannot run
                print(f"; forward+backward FAILED ({str(e).splitlines()[0]}), not timed")
                continue
            print(f", input grad {max_abs_diff(grad, reference_grad):.1e}")
            candidates["fwd+bwd"][name] = fwd_bwd

        for mode, fns in candidates.items():
            # warmup=0: the correctness checks above already ran every candidate once.
            timings = time_interleaved(fns, warmup=0, repeats=args.repeats, budget_s=args.budget_s)
            ours_s = timings["moetron"].median_s
            for name, t in timings.items():
                gflops = flops[mode] / t.median_s / 1e9
                rows.append([
                    name, dtype_name, mode, f"{t.median_s * 1e3:.1f}", t.count, f"{gflops:.1f}",
                    PeakShare(gflops, peaks, dtype_name), PeakShare(gflops, peaks, "fp32"),
                    f"{t.median_s / ours_s:.2f}",
                ])  # fmt: skip
            hf_names = [n for n in timings if n != "moetron"]
            if hf_names:
                fastest = min(hf_names, key=lambda n: timings[n].median_s)
                summary.append((dtype_name, mode, timings[fastest].median_s / ours_s, fastest))

    measure_peaks(list(peaks), peaks)  # again at the end; keeps the better
    print()
    print_table(
        ["impl", "dtype", "pass", "median ms", "n", "GFLOP/s", "%peak dtype", "%peak fp32", "time/ours"], rows
    )
    print()
    print_summary(summary)
    print(peak_line(peaks))
    print(background.line())


if __name__ == "__main__":
    main()
