"""Full-model forward+backward, moetron vs transformers' MixtralForCausalLM, on identical weights.

    python -m benchmarks.train_throughput                    # small preset, 4 layers, batch 4 x seq 256
    python -m benchmarks.train_throughput --num-layers 8 --batch 8 --seq 512 --dtypes fp32
    python -m benchmarks.train_throughput --config configs/gpu_1b.toml --num-layers 0 --device cuda \
        --batch 16 --seq 1024 --dtypes bf16     # a ~1.2B-total MoE on one GPU (benchmarks/gpu_checks.sh)

Weights: transformers builds and initialises a Mixtral, `save_pretrained` writes it, and
`moetron.from_pretrained` loads the directory, so the comparison also exercises the converter.
One step = zero grads, forward and loss as each library's training computes it (moetron:
`model(ids, targets_BT=...)`, the trainer's loss, fused with the output projection; transformers:
`model(input_ids, labels=...).loss`, its Trainer's; the same next-token cross-entropy in fp32 over
the same positions), backward, global grad-norm clipping at 1.0 and an AdamW step, each as its
trainer does them: ours `train.optim.clip_and_step` on `build_optimizer`'s fused AdamW (the clip
folded into the step); transformers' `torch.nn.utils.clip_grad_norm_` then
`torch.optim.AdamW(fused=True)`, its Trainer's default (`adamw_torch_fused`). On a CPU ours runs
with the CPU training kernels the trainer installs (`train.cpu_training_kernels`: attention, MoE,
norms, rotary, loss); transformers with SDPA attention. The process keeps freed memory
(`train.allocator.retain_freed_memory`, as `moetron train` does); that setting is process-wide, so
transformers' step gets it too, as it gets the larger oneDNN kernel cache that importing moetron
sets (`moetron/hardware.py`). Router auxiliary losses are off on both sides: moetron's aux and
z-loss weights are set to 0 (the losses are still computed, just not weighted in) and transformers
runs with output_router_logits=False. Both run dropless (the Mixtral checkpoint carries no capacity
factor), in train mode, no dropout, no KV cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import moetron
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
from moetron.config import ModelConfig, TrainConfig, get_preset, load_run_config
from moetron.hardware import native_bf16_matmul
from moetron.model.accounting import total_params, train_flops_per_token
from moetron.train import cpu_training_kernels
from moetron.train.allocator import retain_freed_memory
from moetron.train.optim import build_optimizer, clip_and_step

FP32_TOLERANCE = 1e-4
LR = 1e-5  # small: the weights barely move, so every timed step runs on the model just checked


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--config", default=None, help="a run TOML whose [model] replaces --preset")
    p.add_argument("--num-layers", type=int, default=4, help="override the depth (0: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models train")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument(
        "--hf-impl", default=None, help="transformers experts implementation (default: its own default)"
    )
    p.add_argument("--max-batched-mm-gib", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed rounds first: a training process's steady state (its heap at its high-water "
        "mark, oneDNN's kernels for the shapes it meets compiled) takes a few steps to reach",
    )
    p.add_argument("--budget-s", type=float, default=60.0, help="per dtype; trims repeats (min 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", type=int, default=0, help="after timing, profile one step of each: its N costliest ops"
    )
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = load_run_config(args.config).model if args.config else get_preset(args.preset)
    moe = dataclasses.replace(cfg.moe, aux_loss_weight=0.0, z_loss_weight=0.0)
    return dataclasses.replace(
        cfg, num_layers=args.num_layers or cfg.num_layers, max_seq_len=max(cfg.max_seq_len, args.seq), moe=moe
    )


def save_mixtral(cfg: ModelConfig, directory: str) -> None:
    """A transformers-initialised Mixtral equivalent to `cfg`, written as an HF model directory."""
    from transformers import MixtralForCausalLM

    MixtralForCausalLM(mixtral_config(cfg)).save_pretrained(directory)


def load_twins(directory: str, dtype: torch.dtype, hf_impl: str | None) -> tuple[nn.Module, nn.Module]:
    """(moetron Transformer, HF Mixtral) from the same directory, each loaded in `dtype` the way
    its users would, in train mode."""
    from transformers import MixtralForCausalLM

    ours = moetron.from_pretrained(directory, dtype=dtype)
    for layer in ours.moe_layers():  # a Mixtral config has no z-loss weight; ours defaults it on
        layer.cfg.aux_loss_weight = layer.cfg.z_loss_weight = 0.0
    kwargs = {} if hf_impl is None else {"experts_implementation": hf_impl}
    hf_model = MixtralForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa", **kwargs
    )
    return ours.train(), hf_model.train()


def next_token_targets(ids_BT: torch.Tensor) -> torch.Tensor:
    """What position t predicts: ids[t + 1], and nothing (-100) at the last position; transformers'
    `labels=ids` shifts the same way inside its loss."""
    targets_BT = torch.roll(ids_BT, -1, dims=1)
    targets_BT[:, -1] = -100
    return targets_BT


def ours_loss(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    targets = next_token_targets(ids)
    return lambda: model(ids, targets_BT=targets)


def hf_loss(hf_model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: hf_model(input_ids=ids, labels=ids, use_cache=False).loss


def torch_clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float
) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def train_step(
    model: nn.Module,
    loss_of: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    clip_and_step: Callable[[torch.optim.Optimizer, list[torch.Tensor], float], object] = torch_clip_and_step,
) -> Callable[[], float]:
    params = list(model.parameters())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        clip_and_step(optimizer, params, 1.0)
        return loss.item()  # after the step: on a GPU this waits for all of it, so it is timed

    return step


def hf_logits(hf_model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: hf_model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def logits_diff(ours: nn.Module, hf_model: nn.Module, ids: torch.Tensor) -> float:
    for model in (ours, hf_model):
        model.eval()
    diff = max_abs_diff(ours(ids), hf_logits(hf_model)(ids))
    for model in (ours, hf_model):
        model.train()
    return diff


def working_hf_step(
    hf_model: nn.Module, impls: list[str], ids: torch.Tensor, tag: str
) -> tuple[str, Callable[[], float], float]:
    """The first experts implementation in `impls` whose forward+backward runs, with its step
    and loss. Each failure is printed with its reason."""
    for impl in impls:
        hf_model.set_experts_implementation(impl)
        optimizer = torch.optim.AdamW(hf_model.parameters(), lr=LR, fused=True)
        step = train_step(hf_model, hf_loss(hf_model, ids), optimizer)
        try:
            return impl, step, step()
        except RuntimeError as e:  # e.g. a CPU grouped_mm backward that cannot run
            print(
                f"  [{tag}] transformers experts={impl!r}: forward+backward FAILED: {str(e).splitlines()[0]}"
            )
    raise SystemExit(f"no transformers experts implementation among {impls} can train here")


# The speedup each kind of CPU must show: moetron in the dtype `train.dtype = "auto"` picks there,
# against transformers in whichever measured dtype is fastest for it.
REGIME_TARGETS = {"bf16": 2.0, "fp32": 1.1}


def print_profile(name: str, step: Callable[[], float], device: torch.device, row_limit: int) -> None:
    """One step of `step` under torch.profiler: its costliest ops by self time on the device that
    runs them (the GPU's kernels on CUDA), and the wall time against the busy device time, which
    shows a step bound by launches and host syncs rather than by its kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        wall_s = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy_us = sum(getattr(e, key) for e in averages)
    print(
        f"\nprofile of one {name} step: wall {wall_s * 1e3:.0f} ms (profiled), {key} {busy_us / 1e3:.0f} ms"
    )
    print(averages.table(sort_by=key, row_limit=row_limit, max_name_column_width=60))


def print_regime_verdict(step_s: dict[tuple[str, str], float]) -> None:
    """The line that counts for this CPU: bf16-capable (auto trains in bf16, target 2x) or not
    (auto trains in fp32, target 1.1x), against transformers' fastest measured dtype."""
    auto = "bf16" if native_bf16_matmul("cpu") else "fp32"
    hf = {dtype: s for (side, dtype), s in step_s.items() if side == "transformers"}
    if ("moetron", auto) not in step_s:
        print(f"this CPU trains in {auto} (train.dtype=auto): run with --dtypes {auto} for its verdict")
        return
    hf_dtype = min(hf, key=hf.__getitem__)
    speedup, target = hf[hf_dtype] / step_s["moetron", auto], REGIME_TARGETS[auto]
    kind = "bf16-capable" if auto == "bf16" else "without fast bf16"
    print(
        f"this CPU ({kind}): moetron {auto} (train.dtype=auto) {speedup:.2f}x transformers' fastest "
        f"measured ({hf_dtype}); {'meets' if speedup >= target else 'MISSES'} the >= {target:.1f}x target"
    )


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    retain_freed_memory()
    quiet_transformers()
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    num_tokens = args.batch * args.seq
    flops_per_step = train_flops_per_token(cfg, args.seq) * num_tokens
    background = CpuMeter()
    device = torch.device(args.device)
    print(machine_line())
    peaks = measure_peaks(["fp32", "bf16"], device=device)
    print(peak_line(peaks, device))

    hf_default = hf_experts_default()
    first_choice = args.hf_impl or hf_default
    # Fallbacks, in order, should the first choice fail to train; batched_mm only where it fits.
    impls = [first_choice] + [i for i in hf_experts_options() if i != first_choice]
    if batched_mm_bytes(num_tokens, cfg, torch.float32) > args.max_batched_mm_gib * 2**30:
        impls = [i for i in impls if i != "batched_mm" or i == first_choice]
    print(
        f"model: {args.config or args.preset + ' preset'}, {cfg.num_layers} layers, {total_params(cfg) / 1e6:.0f}M params; "
        f"batch {args.batch} x seq {args.seq} = {num_tokens} tokens/step; "
        f"{flops_per_step / 1e9:.0f} GFLOP/step (accounting.train_flops_per_token); "
        f"transformers' default experts implementation here: {hf_default!r}, trying {impls} in order; "
        "router aux losses off on both sides"
    )
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq)).to(device)

    rows, summary, step_s = [], [], {}  # step_s[(side, dtype)]: median seconds
    with tempfile.TemporaryDirectory(prefix="moetron-bench-") as directory:
        save_mixtral(cfg, directory)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            ours, hf_model = (m.to(device) for m in load_twins(directory, dtype, first_choice))
            if dtype == torch.float32:  # the gate; in bf16 the loss comparison below suffices
                diff = logits_diff(ours, hf_model, ids)
                print(f"  [{dtype_name}] max |ours - HF| logits {diff:.1e}")
                if diff > FP32_TOLERANCE:
                    raise SystemExit(
                        f"fp32 logits differ by {diff:.1e} > {FP32_TOLERANCE}: not the same model"
                    )
            cpu_training_kernels.install(ours)  # as the trainer does (nothing for a model on a GPU)
            optimizer = build_optimizer(ours, TrainConfig(lr=LR, weight_decay=0.0))
            ours_step = train_step(ours, ours_loss(ours, ids), optimizer, clip_and_step)
            ours_loss_value = ours_step()
            impl, hf_step, hf_loss_value = working_hf_step(hf_model, impls, ids, dtype_name)
            print(
                f"  [{dtype_name}] loss ours {ours_loss_value:.5f} HF {hf_loss_value:.5f}; transformers experts: {impl!r}"
            )
            if impl != first_choice:
                print(f"  [{dtype_name}] NOTE: {first_choice!r} could not train, fell back to {impl!r}")

            hf_name = f"HF {impl}" + (" (default)" if impl == hf_default else "")
            fns = {"moetron": ours_step, hf_name: hf_step}
            timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s)
            ours_s = timings["moetron"].median_s
            for name, t in timings.items():
                gflops = flops_per_step / t.median_s / 1e9
                rows.append([
                    name, dtype_name, f"{t.median_s * 1e3:.0f}", t.count,
                    f"{num_tokens / t.median_s:.0f}", f"{gflops:.1f}", PeakShare(gflops, peaks, dtype_name),
                    PeakShare(gflops, peaks, "fp32"), f"{t.median_s / ours_s:.2f}",
                ])  # fmt: skip
            summary.append((dtype_name, "train step", timings[hf_name].median_s / ours_s, hf_name))
            step_s["moetron", dtype_name] = ours_s
            step_s["transformers", dtype_name] = timings[hf_name].median_s
            if args.profile:
                for name, fn in fns.items():
                    print_profile(f"{name} {dtype_name}", fn, device, args.profile)

    measure_peaks(list(peaks), peaks, device)  # again at the end; keeps the better
    print()
    print_table(
        ["impl", "dtype", "step ms", "n", "tokens/s", "GFLOP/s", "%peak dtype", "%peak fp32", "time/ours"],
        rows,
    )
    print()
    print_summary(summary, targets=device.type == "cpu")
    if device.type == "cpu":
        print_regime_verdict(step_s)
    print(peak_line(peaks, device))
    print(background.line())


if __name__ == "__main__":
    main()
