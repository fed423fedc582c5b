"""Shared by the trainer-level distributed tests: one tiny corpus prepared once, the run settings,
launching torchrun, and the single-process reference run.

Same global batch in every layout: 4 windows of 32 tokens per step, each micro-batch (the group
of tokens a router's aux loss is computed over) one window. The single-process reference takes
them as batch_size=1 x grad_accum_steps=4; a layout with D data-parallel ranks as batch_size=1 x
grad_accum_steps=4/D (the loader deals consecutive windows to consecutive dp ranks); a pipeline
as batch_size=2 x pp_microbatches=2. The 4 validation windows are the same too (eval_batches
scaled the same way), so the validation loss must match as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from moetron.config import load_run_config
from moetron.data import prepare, read_documents

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.toml")
STEPS = 5
WINDOWS_PER_STEP = 4
REL_TOL = 1e-4


def make_corpus(directory: Path) -> Path:
    """~60 KB of the bundled Shakespeare as plain-text documents."""
    directory.mkdir(parents=True, exist_ok=True)
    size = 0
    for k, document in enumerate(read_documents(["shakespeare"])):
        (directory / f"doc{k:04d}.txt").write_text(document)
        size += len(document)
        if size > 60_000:
            break
    return directory


def settings(corpus: Path, data_dir: Path, out_dir: Path, batch_size: int, dp: int, *extra: str) -> list[str]:
    """--section.key=value overrides of configs/tiny.toml for one run of the equivalence suite."""
    grad_accum = WINDOWS_PER_STEP // (batch_size * dp)
    return [
        f"--data.sources=['{corpus}']",
        f"--data.dir={data_dir}",
        f"--train.out_dir={out_dir}",
        "--train.progress=false",
        f"--train.steps={STEPS}",
        "--train.seq_len=32",
        "--train.warmup_steps=2",
        f"--train.eval_every={STEPS}",
        f"--train.eval_batches={WINDOWS_PER_STEP // (batch_size * dp)}",
        "--train.checkpoint_every=3",  # step 3 (and the last): what the resharding tests resume from
        f"--train.batch_size={batch_size}",
        f"--train.grad_accum_steps={grad_accum}",
        # fp32 on every machine: the suite checks that layouts compute the same numbers (within 1e-4),
        # which bf16 roundings in different reduction orders would exceed where "auto" picks bf16.
        "--train.dtype=float32",
        *extra,
    ]


def prepare_data(corpus: Path, data_dir: Path) -> None:
    """Tokenize once, so every launch finds the shards ready."""
    cfg = load_run_config(CONFIG, settings(corpus, data_dir, data_dir / "unused", 1, 1))
    prepare(cfg.data, seed=cfg.train.seed)


def shared_suite(basetemp: Path) -> dict:
    """Corpus, prepared data and the single-process reference run, made once per pytest session
    (under its base temporary directory) for every distributed test module."""
    from moetron.train.trainer import train

    root = basetemp / "moetron-distributed"
    suite = {"root": root, "corpus": root / "corpus", "data": root / "data", "reference": root / "reference"}
    if not (root / "reference" / "final" / "model.safetensors").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_corpus(suite["corpus"])
        prepare_data(suite["corpus"], suite["data"])
        train(load_run_config(CONFIG, settings(suite["corpus"], suite["data"], suite["reference"], 1, 1)))
    return suite


def torchrun(nproc: int, args: list[str], *, max_restarts: int = 0, timeout: float = 240) -> str:
    """Launch `nproc` local ranks on gloo; args: `-m moetron train CONFIG ...` or a script.
    Returns stdout + stderr; fails the test with them if the job failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPUs even on a GPU machine: the numbers are fp32-exact
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}", *args,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def exit_rank() -> None:
    """End a torchrun test script's rank once its results are written or printed: leave the process
    group, then skip interpreter teardown, which once in a few runs aborts ("terminate called
    without an active exception", a C++ thread of the profiler or gloo destroyed while joinable)
    after all the work is done and would fail a passing run."""
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(ours: list[dict], reference: list[dict]) -> None:
    """Per step: LM loss and global grad norm within REL_TOL relative, the same expert loads (summed
    over data-parallel ranks); and the validation loss at the end."""
    by_step = {r["step"]: r for r in ours}
    assert sorted(by_step) == list(range(1, STEPS + 1)), sorted(by_step)
    for ref in reference:
        got = by_step[ref["step"]]
        for key in ("lm_loss", "grad_norm") + (("val_loss",) if "val_loss" in ref else ()):
            error = abs(got[key] - ref[key]) / abs(ref[key])
            assert error <= REL_TOL, f"step {ref['step']} {key}: {got[key]} vs {ref[key]} (rel {error:.1e})"
        assert got["expert_load"] == ref["expert_load"], f"step {ref['step']} expert_load"
