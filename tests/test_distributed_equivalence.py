"""Every parallel layout trains like one process: torchrun on gloo (CPU), tiny model, fixed data,
fp32, the same global batch (tests/dist/harness.py); per-step LM loss and global grad norm within
1e-4 relative of the single-process run, the same expert loads, the same validation loss, and an
HF export with the same weights. Checkpoints saved under one layout resume under another."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moetron.config import load_run_config
from moetron.train.trainer import train

_spec = importlib.util.spec_from_file_location("harness", Path(__file__).parent / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

pytestmark = pytest.mark.distributed

# name: (processes, batch_size, data-parallel degree, overrides)
LAYOUTS = {
    "dp_shard=2": (2, 1, 2, ["--parallel.dp_shard=2"]),
    "dp_replicate=2": (2, 1, 2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "tp=2": (2, 1, 1, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "ep=2": (2, 1, 2, ["--parallel.ep=2", "--parallel.dp_shard=2"]),
    "pp=2-1f1b": (2, 2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1f1b"]),
    "dp_replicate=2xdp_shard=2xep=2": (
        4, 1, 4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.ep=2"],
    ),
    "tp=2xpp=2-gpipe": (
        4, 2, 1, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=gpipe"],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    return {**harness.shared_suite(tmp_path_factory.getbasetemp()), "runs": {}}


def _settings(suite: dict, out_dir: Path, batch_size: int, dp: int, *extra: str) -> list[str]:
    return harness.settings(suite["corpus"], suite["data"], out_dir, batch_size, dp, *extra)


def _run_layout(suite: dict, name: str) -> Path:
    """`torchrun -m moetron train` in layout `name`, once per module (the resharding test reuses it)."""
    if name not in suite["runs"]:
        nproc, batch_size, dp, extra = LAYOUTS[name]
        out_dir = suite["root"] / name
        harness.torchrun(
            nproc,
            ["-m", "moetron", "train", harness.CONFIG, *_settings(suite, out_dir, batch_size, dp, *extra)],
        )
        suite["runs"][name] = out_dir
    return suite["runs"][name]


def _copy_until(run_dir: Path, out_dir: Path, step: int) -> None:
    """A run directory as a job killed after checkpoint `step` would have left it."""
    shutil.copytree(run_dir, out_dir)
    shutil.rmtree(out_dir / "final")
    for path in (out_dir / "checkpoints").iterdir():
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(suite: dict, name: str) -> None:
    out_dir = _run_layout(suite, name)
    ours, reference = harness.records(out_dir), harness.records(suite["reference"])
    harness.assert_same_run(ours, reference)

    nproc = LAYOUTS[name][0]
    assert ours[0]["layout"]["world_size"] == nproc
    for record in ours:
        assert len(record["peak_memory_bytes"]) == nproc and min(record["peak_memory_bytes"]) > 0
    (profiled,) = [r for r in ours if "comm_time_s" in r]  # one sampled step per run
    assert profiled["step"] == 2 and len(profiled["comm_time_s"]) == nproc
    assert all(0 < t < 2 * profiled["step_time_s"] for t in profiled["comm_time_s"])  # ranks differ a bit

    # the HF export, gathered from the shards on rank 0, holds the single-process weights
    exported = load_file(out_dir / "final" / "model.safetensors")
    expected = load_file(suite["reference"] / "final" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        error = float((exported[key] - tensor).norm() / tensor.norm().clamp_min(1e-12))  # a zero bias
        assert error <= harness.REL_TOL, f"{key}: relative difference {error:.1e}"


def test_checkpoint_from_ep2_resumes_in_one_process(suite: dict, capsys) -> None:
    """The step-3 DCP checkpoint of the ep=2 job (experts sharded over two ranks), continued by
    one process running the job's own settings (no resume flag): grad_accum_steps goes from 2 to
    4 to keep the global batch, and steps 4-5 are those of the uninterrupted single-process run."""
    out_dir = suite["root"] / "ep2-to-1"
    _copy_until(_run_layout(suite, "ep=2"), out_dir, 3)
    assert (out_dir / "checkpoints" / "step_00000003" / ".metadata").is_file()  # the DCP format
    settings = _settings(suite, out_dir, 1, 2, "--train.eval_batches=4")  # the ep=2 job's, less parallel.*
    result = train(load_run_config(harness.CONFIG, settings))
    assert "train.grad_accum_steps=4 (was 2)" in capsys.readouterr().out
    assert result.final_dir is not None
    records = harness.records(out_dir)
    harness.assert_same_run(records, harness.records(suite["reference"]))
    assert records[3]["step"] == 4 and "layout" not in records[3]  # written by the single process


def test_checkpoint_from_one_process_resumes_with_dp_shard2(suite: dict) -> None:
    """The single-process (safetensors) step-3 checkpoint, continued by FSDP over two ranks."""
    out_dir = suite["root"] / "1-to-dp_shard2"
    _copy_until(suite["reference"], out_dir, 3)
    assert (out_dir / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    nproc, batch_size, dp, extra = LAYOUTS["dp_shard=2"]
    args = _settings(suite, out_dir, batch_size, dp, *extra, "--train.resume=true")
    output = harness.torchrun(nproc, ["-m", "moetron", "train", harness.CONFIG, *args])
    assert "resumed from step 3" in output
    records = harness.records(out_dir)
    harness.assert_same_run(records, harness.records(suite["reference"]))
    assert records[3]["layout"]["dp_shard"] == 2  # steps 4-5 came from the FSDP job


def test_time_budget_stops_every_rank_on_the_slowest_clock(suite: dict) -> None:
    """dp_shard=2 with train.time_budget_s=3, rank 0's steps lasting 0.5 s and rank 1's 1 s (stepped
    clocks, tests/dist/train.py): both ranks stop after step 3 (rank 0 on its own clock would train
    6 and then wait in a collective rank 1 never joins), with the learning rates of rank 1's clock."""
    from moetron.train.optim import lr_at

    out_dir = suite["root"] / "time-budget"
    nproc, batch_size, dp, extra = LAYOUTS["dp_shard=2"]
    budget = ("--train.time_budget_s=3", "--train.steps=20", "--train.warmup_steps=1")
    args = _settings(suite, out_dir, batch_size, dp, *extra, *budget)
    harness.torchrun(
        nproc, [str(harness.ROOT / "tests" / "dist" / "train.py"), harness.CONFIG, *args, "--slow-rank=1"]
    )
    records = harness.records(out_dir)
    assert [r["step"] for r in records] == [1, 2, 3] and "val_bpb" in records[-1]
    assert (out_dir / "final" / "model.safetensors").is_file()
    tc = load_run_config(harness.CONFIG, args).train
    assert [r["lr"] for r in records] == [lr_at(s, tc, 1.0 * (s - 1), 1.0) for s in (1, 2, 3)]
    assert records[-1]["lr"] != lr_at(3, tc, 0.5 * 2, 0.5)  # what rank 0's own clock would give
