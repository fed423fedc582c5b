"""Expert parallelism on gloo against one process (tests/dist/ep_layer.py under torchrun): MoE
layer outputs and gradients for random, token-dropping, rank-local and all-to-one-rank routing;
a Transformer's gradients, an SGD step and a DCP checkpoint loaded into a plain model; FSDP on top
with mesh.py's dp_shard_mod_ep × ep layout."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


_spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def run_ep_script(nproc: int, checkpoint_dir: Path, *cases: str) -> str:
    script = str(ROOT / "tests" / "dist" / "ep_layer.py")
    output = harness.torchrun(nproc, [script, str(checkpoint_dir), *cases], timeout=300)
    assert "EP CHECKS PASSED" in output
    return output


def passed_cases(stdout: str, nproc: int) -> list[set[str]]:
    ranks = [set(m.split()) for m in re.findall(r"^rank \d+ passed: (.*)$", stdout, flags=re.M)]
    assert len(ranks) == nproc, stdout
    return ranks


LAYER_CASES = {"errors", "layer/random", "layer/capacity", "layer/local_only", "layer/all_to_rank0"}


@pytest.mark.distributed
def test_ep2_layer_model_checkpoint_and_fsdp_match_one_process(tmp_path: Path) -> None:
    stdout = run_ep_script(2, tmp_path)
    assert passed_cases(stdout, 2) == [LAYER_CASES | {"model", "fsdp"}] * 2
    print(*re.findall(r"^rank \d+ timing: .*$", stdout, flags=re.M), sep="\n")  # pytest -s shows it


@pytest.mark.distributed
def test_ep4_layer_and_fsdp_dp_shard_2_x_ep_2_match_one_process(tmp_path: Path) -> None:
    # ep=4 for the layer cases; FSDP over dp_shard_mod_ep=2 with ep=2 (gloo reduces by sum + divide).
    stdout = run_ep_script(4, tmp_path, "layer", "fsdp")
    assert passed_cases(stdout, 4) == [LAYER_CASES | {"fsdp"}] * 4
