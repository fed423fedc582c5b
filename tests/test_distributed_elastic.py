"""Elastic restart: torchrun --max-restarts=1; one rank is SIGKILLed in the middle of a step; torchrun
restarts the whole group, which resumes from the newest checkpoint (DCP) and finishes with the
losses of an uninterrupted run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("harness", Path(__file__).parent / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.mark.distributed
def test_killed_rank_restarts_from_newest_checkpoint_and_finishes_the_same(tmp_path_factory) -> None:
    suite = harness.shared_suite(tmp_path_factory.getbasetemp())
    out_dir = suite["root"] / "elastic"
    # dp_shard=2, 2 micro-batches per step, checkpoints at steps 3 and 5: rank 1 dies asking for
    # its 9th micro-batch, the first of step 5, so the newest checkpoint is step 3's.
    args = harness.settings(
        suite["corpus"], suite["data"], out_dir, 1, 2, "--parallel.dp_shard=2", "--train.resume=true"
    )
    script = str(harness.ROOT / "tests" / "dist" / "train.py")
    output = harness.torchrun(
        2, [script, harness.CONFIG, *args, "--kill-rank=1", "--kill-at-batch=9"], max_restarts=1
    )
    assert "rank 1: SIGKILL at micro-batch 9" in output
    assert "resumed from step 3" in output  # the second attempt, after torchrun's restart
    records = harness.records(out_dir)
    harness.assert_same_run(records, harness.records(suite["reference"]))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert (out_dir / "final" / "model.safetensors").is_file()
