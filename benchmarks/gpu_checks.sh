#!/usr/bin/env bash
# The GPU checks (issue 14, item 9), one script for a lent GPU machine; CI never runs it.
#   bash benchmarks/gpu_checks.sh            # logs and metrics under $OUT (default /tmp/gpu_checks)
# 1. device, measured bf16/fp32 matmul peaks, grouped_mm under autocast, exact resume on the GPU,
#    NCCL between two ranks;
# 2. `moetron train` of a ~1.2B-total MoE (configs/gpu_1b.toml) in bf16 autocast: tokens/s, MFU;
# 3. benchmarks/train_throughput.py on the same model against transformers' Mixtral, bf16;
# 4. with two or more GPUs, the distributed equivalence tests (they pick NCCL where CUDA is).
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$OUT/env.log"
timeout 120 $py -m benchmarks.gpu_checks 2>&1 | tee -a "$OUT/env.log"
timeout 240 $py -m moetron train configs/gpu_1b.toml --train.progress=false --train.overwrite=true 2>&1 | tee "$OUT/train.log"
cp runs/gpu_1b/metrics.jsonl "$OUT/" 2>/dev/null
$py - <<'PY' 2>&1 | tee -a "$OUT/train.log"
import json, statistics
rows = [json.loads(line) for line in open("runs/gpu_1b/metrics.jsonl")]
steady = [r for r in rows if r["step"] > 5]
print(f"trainer: {rows[0].get('dtype')} ({rows[0].get('dtype_reason')}), peak {rows[0].get('peak_flops', 0) / 1e12:.0f} TFLOP/s; "
      f"steps 6-{rows[-1]['step']}: median {statistics.median(r['tokens_per_s'] for r in steady):,.0f} tokens/s, "
      f"MFU {statistics.median(r['mfu'] for r in steady):.1%}, step {statistics.median(r['step_time_s'] for r in steady) * 1e3:.0f} ms; "
      f"loss {rows[0]['lm_loss']:.3f} -> {rows[-1]['lm_loss']:.3f}, val_bpb {rows[-1].get('val_bpb')}")
PY
rm -rf runs/gpu_1b
timeout 300 $py -m benchmarks.train_throughput --config configs/gpu_1b.toml --num-layers 0 --device cuda \
    --batch 16 --seq 1024 --dtypes bf16 --warmup 5 --repeats 10 --budget-s 60 2>&1 | tee "$OUT/bench.log"
if [ "$($py -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    timeout 600 $py -m pytest -q -m distributed tests/test_distributed_equivalence.py 2>&1 | tee "$OUT/dist.log"
fi
