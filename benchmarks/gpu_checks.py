"""The GPU checks that need no model directory, for benchmarks/gpu_checks.sh: the device and its
measured matmul peaks, the grouped expert matmul under bf16 autocast against the per-expert loop,
exact resume of a one-process training run on the GPU (configs/tiny.toml: 10 steps, then resumed
to 20, against 20 straight), and NCCL between two ranks (on one GPU when the machine has one: NCCL
refuses two ranks on the same device, which is what a one-GPU machine can show).

    python -m benchmarks.gpu_checks
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moetron import hardware
from moetron.model.moe import grouped_swiglu


def describe_device() -> None:
    hw = hardware.detect()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; {hw.describe()}")
    for dtype in (torch.bfloat16, torch.float32):
        peak = hardware.matmul_peak_flops(dtype, "cuda", repeats=10)
        print(f"measured matmul peak (F.linear 8192^3) {dtype}: {peak / 1e12:.0f} TFLOP/s")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"torch.backends.cuda.matmul.allow_tf32={tf32} (fp32 above is {'TF32' if tf32 else 'full fp32'})")


def check_grouped_mm_under_autocast() -> None:
    """fp32 master weights under bf16 autocast: one grouped_mm (bf16 in, fp32 accumulate) against
    a loop of autocast F.linear per expert: the same products, so the same up to bf16 output
    rounding and summation order."""
    torch.manual_seed(0)
    E, D, H, N = 16, 1024, 2048, 8192
    w1, w3 = (torch.randn(E, H, D, device="cuda") / D**0.5 for _ in range(2))
    w2 = torch.randn(E, D, H, device="cuda") / H**0.5
    x = torch.randn(N, D, device="cuda")
    counts = torch.multinomial(torch.ones(E), N, replacement=True).to("cuda").bincount(minlength=E)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = grouped_swiglu(x, counts, w1, w2, w3)
        rows = x.split(counts.tolist())
        loop = torch.cat([
            F.linear(F.silu(F.linear(r, w1[e])) * F.linear(r, w3[e]), w2[e]) for e, r in enumerate(rows)
        ])  # fmt: skip
    diff = (grouped.float() - loop.float()).abs().max().item()
    scale = loop.float().abs().max().item()
    ok = grouped.dtype == torch.bfloat16 and diff <= 2e-2 * scale
    print(
        f"grouped_mm under autocast: dtype {grouped.dtype}, max |grouped - loop| {diff:.2e} (max |out| {scale:.2f}): {'OK' if ok else 'FAIL'}"
    )


def check_exact_resume() -> None:
    import json
    import tempfile
    from pathlib import Path

    from moetron.config import load_run_config
    from moetron.train.trainer import train

    def run(out: Path, stop_after: int | None = None) -> list[tuple]:
        cfg = load_run_config("configs/tiny.toml", [f"--train.out_dir={out}", "--train.progress=false"])
        train(cfg, stop_after=stop_after)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["lm_loss"], r["grad_norm"]) for r in rows]

    with tempfile.TemporaryDirectory() as tmp:
        straight = run(Path(tmp) / "straight")
        run(Path(tmp) / "resumed", stop_after=10)
        resumed = run(Path(tmp) / "resumed")
    same = resumed == straight and len(straight) == 20
    print(
        f"exact resume on the GPU (tiny, 10 + 10 vs 20 steps): {'OK' if same else 'FAIL'}; last step {straight[-1]}"
    )
    if not same:
        print(f"  straight {straight}\n  resumed  {resumed}")


def _nccl_rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        torch.cuda.synchronize()
        print(
            f"  rank {rank} on {device}: all_reduce -> {t.tolist()} (expected {sum(range(1, world_size + 1))})"
        )
        dist.destroy_process_group()
    except Exception as e:
        print(f"  rank {rank} on {device}: NCCL FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        sys.exit(1)


def check_nccl(world_size: int = 2) -> None:
    print(
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {world_size} ranks on {torch.cuda.device_count()} GPU(s):"
    )
    mp.start_processes(
        _nccl_rank, args=(world_size, 29517), nprocs=world_size, start_method="spawn", join=False
    ).join(timeout=60)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    describe_device()
    check_grouped_mm_under_autocast()
    check_exact_resume()
    try:
        check_nccl()
    except Exception as e:
        print(f"NCCL probe: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


if __name__ == "__main__":
    main()
