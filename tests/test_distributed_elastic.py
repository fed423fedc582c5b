"""Elastic restart: torchrun --max-restarts=1; one rank is SIGKILLed in the middle of a step; torchrun
restarts the whole group, which resumes from the newest checkpoint with no resume flag and finishes
with the losses of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("harness", Path(__file__).parent / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nproc", "overwrite"), [(2, False), (2, True), (1, True)], ids=["auto", "overwrite", "overwrite-1proc"]
)
def test_killed_rank_restarts_from_newest_checkpoint_and_finishes_the_same(
    tmp_path_factory, nproc: int, overwrite: bool
) -> None:
    """overwrite: out_dir starts with another run in it, which the first attempt removes; the
    restarted attempt continues the job's own run instead of removing that too."""
    suite = harness.shared_suite(tmp_path_factory.getbasetemp())
    out_dir = suite["root"] / f"elastic-{nproc}-{overwrite}"
    extra = ["--parallel.dp_shard=2"] if nproc == 2 else []
    if overwrite:
        shutil.copytree(suite["reference"], out_dir)  # "another run", its log marked as such
        (out_dir / "metrics.jsonl").write_text(json.dumps({"step": 99, "lm_loss": 0.0}) + "\n")
        extra.append("--train.overwrite=true")
    # 4 micro-batches per step over nproc ranks, checkpoints at steps 3 and 5: the last rank dies
    # asking for the first micro-batch of step 5, so the newest checkpoint is step 3's.
    kill_at = 4 // nproc * 4 + 1
    args = harness.settings(suite["corpus"], suite["data"], out_dir, 1, nproc, *extra)
    script = str(harness.ROOT / "tests" / "dist" / "train.py")
    output = harness.torchrun(
        nproc,
        [script, harness.CONFIG, *args, f"--kill-rank={nproc - 1}", f"--kill-at-batch={kill_at}"],
        max_restarts=1,
    )
    assert f"rank {nproc - 1}: SIGKILL at micro-batch {kill_at}" in output
    assert "resumed from step 3" in output  # the second attempt, after torchrun's restart
    assert output.count("removed the previous run's outputs") == (1 if overwrite else 0)
    records = harness.records(out_dir)
    harness.assert_same_run(records, harness.records(suite["reference"]))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert (out_dir / "final" / "model.safetensors").is_file()
