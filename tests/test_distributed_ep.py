"""Expert parallelism on gloo against one process (tests/dist/ep_layer.py under torchrun): MoE
layer outputs and gradients for random, token-dropping, rank-local and all-to-one-rank routing;
a Transformer's gradients, an SGD step and a DCP checkpoint loaded into a plain model; FSDP on top
with mesh.py's dp_shard_mod_ep × ep layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_ep_script(nproc: int, checkpoint_dir: Path, *cases: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "tests" / "dist" / "ep_layer.py"),
            str(checkpoint_dir),
            *cases,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"ep_layer.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "EP CHECKS PASSED" in proc.stdout
    return proc.stdout


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
