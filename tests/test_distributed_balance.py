"""The router selection bias (train/balance.py) under parallel layouts: torchrun on gloo, the
equivalence suite's tiny runs (tests/dist/harness.py) with a bias rate that moves routing within
its 5 steps and the sequence-wise aux loss. Each layout must log the single process's expert loads
and max |bias| at every step and export exactly its biases: the update is a function of the
global load, which every rank sums alike, so the replicated bias never needs communicating. The
bias also travels through a DCP checkpoint (saved sharded, resumed in one process)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetron.config import load_run_config
from moetron.train.trainer import train

_spec = importlib.util.spec_from_file_location("harness", Path(__file__).parent / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

pytestmark = pytest.mark.distributed

BALANCE = ("--model.moe.bias_update_rate=0.02", "--model.moe.aux_loss_type=sequence")
# name: (processes, batch_size, data-parallel degree, overrides); FSDP, DP and EP in the first
LAYOUTS = {
    "dp_shard=2xep=2": (2, 1, 2, ["--parallel.dp_shard=2", "--parallel.ep=2"]),
    "tp=2": (2, 1, 1, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "pp=2": (2, 2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1f1b"]),
}  # fmt: skip
BIAS = "e_score_correction_bias"


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """Corpus, prepared data and the single-process reference, once per module."""
    root = tmp_path_factory.getbasetemp() / "moetron-balance"
    suite = {"root": root, "corpus": root / "corpus", "data": root / "data", "runs": {}}
    harness.make_corpus(suite["corpus"])
    harness.prepare_data(suite["corpus"], suite["data"])
    suite["reference"] = root / "reference"
    train(load_run_config(harness.CONFIG, _settings(suite, suite["reference"], 1, 1)))
    return suite


def _settings(suite: dict, out_dir: Path, batch_size: int, dp: int, *extra: str) -> list[str]:
    return harness.settings(suite["corpus"], suite["data"], out_dir, batch_size, dp, *BALANCE, *extra)


def _exported_bias(out_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(out_dir / "final" / "model.safetensors")
    return {name: t for name, t in tensors.items() if name.endswith(BIAS)}


def _run_layout(suite: dict, name: str) -> Path:
    if name not in suite["runs"]:
        nproc, batch_size, dp, extra = LAYOUTS[name]
        out_dir = suite["root"] / name
        args = ["-m", "moetron", "train", harness.CONFIG, *_settings(suite, out_dir, batch_size, dp, *extra)]
        harness.torchrun(nproc, args)
        suite["runs"][name] = out_dir
    return suite["runs"][name]


def _assert_same_bias(out_dir: Path, reference: Path) -> None:
    ours, theirs = harness.records(out_dir), harness.records(reference)
    harness.assert_same_run(ours, theirs)  # losses, grad norms, and the expert loads exactly
    assert [r["max_abs_expert_bias"] for r in ours] == [r["max_abs_expert_bias"] for r in theirs]
    assert [r["max_load_ratio"] for r in ours] == [r["max_load_ratio"] for r in theirs]
    exported, expected = _exported_bias(out_dir), _exported_bias(reference)
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key


def test_reference_run_ends_with_a_bias(suite: dict) -> None:
    """What the layouts are compared on: a nonzero bias, exported (one tensor per MoE layer)."""
    assert harness.records(suite["reference"])[-1]["max_abs_expert_bias"] > 0
    assert len(_exported_bias(suite["reference"])) == 2


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_updates_the_bias_as_one_process(suite: dict, name: str) -> None:
    _assert_same_bias(_run_layout(suite, name), suite["reference"])


def test_bias_resumes_from_a_sharded_checkpoint_in_one_process(suite: dict) -> None:
    """The FSDP+EP job's step-3 DCP checkpoint (the bias replicated on both ranks), continued by one
    process: steps 4-5 and the exported bias are the uninterrupted single-process run's."""
    source = _run_layout(suite, "dp_shard=2xep=2")
    out_dir = suite["root"] / "resumed"
    shutil.copytree(source, out_dir)
    shutil.rmtree(out_dir / "final")
    for path in (out_dir / "checkpoints").iterdir():
        if int(path.name.removeprefix("step_")) > 3:
            shutil.rmtree(path)
    assert (out_dir / "checkpoints" / "step_00000003" / ".metadata").is_file()  # the DCP format
    train(load_run_config(harness.CONFIG, _settings(suite, out_dir, 1, 2, "--train.eval_batches=4")))
    _assert_same_bias(out_dir, suite["reference"])
