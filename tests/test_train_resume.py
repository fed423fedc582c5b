"""A run never destroys another run's results: train.resume ("auto" by default) and train.overwrite
against what out_dir holds, model-shape and global-batch checks on resume (moetron/train/resume.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import write_shakespeare_corpus

from moetron.config import ConfigError, TrainConfig, load_run_config
from moetron.train import checkpoint as ckpt
from moetron.train.resume import clear_previous_run
from moetron.train.trainer import train

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """A corpus, its prepared data, and one finished run: 6 steps of batch_size=1 x
    grad_accum_steps=4, checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("resume")
    corpus = write_shakespeare_corpus(root / "corpus", 60_000)
    suite = {"corpus": corpus, "data": root / "data", "run": root / "run"}
    result = train(_config(suite, suite["run"]))
    assert result.final_dir is not None
    return suite


def _config(suite: dict, out_dir: Path, *overrides: str):
    return load_run_config(
        "configs/tiny.toml",
        [
            f"--data.sources=['{suite['corpus']}']",
            f"--data.dir={suite['data']}",
            f"--train.out_dir={out_dir}",
            "--train.progress=false",
            f"--train.steps={STEPS}",
            "--train.eval_every=3",
            "--train.checkpoint_every=3",
            "--train.batch_size=1",
            "--train.grad_accum_steps=4",
            *overrides,
        ],
    )


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(out_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["lm_loss"], r["grad_norm"]) for r in _records(out_dir)]


def _copy_until(run_dir: Path, out_dir: Path, step: int) -> Path:
    """`run_dir` as a job killed after checkpoint `step` would have left it."""
    shutil.copytree(run_dir, out_dir)
    shutil.rmtree(out_dir / "final")
    for path in ckpt.list_checkpoints(out_dir / "checkpoints"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    return out_dir


def _checkpoint_names(out_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out_dir / "checkpoints")]


def test_resume_setting_values() -> None:
    assert TrainConfig().resume == "auto" and TrainConfig().overwrite is False
    assert load_run_config(None, ["--train.resume=auto"]).train.resume == "auto"
    assert load_run_config(None, ["--train.resume=false"]).train.resume is False
    with pytest.raises(ConfigError, match=r"train\.resume='yes' must be one of 'auto', True, False"):
        load_run_config(None, ["--train.resume=yes"])
    with pytest.raises(ConfigError, match=r"train\.resume=1 must be"):
        TrainConfig(resume=1)
    with pytest.raises(ConfigError, match=r"train\.overwrite=true .* train\.resume=true"):
        load_run_config(None, ["--train.resume=true", "--train.overwrite=true"])


def test_auto_starts_fresh_then_the_same_command_continues(reference, tmp_path) -> None:
    """No flag: a fresh out_dir starts at step 1; the same command after a kill continues, as
    a torchrun --max-restarts restart does, and matches the uninterrupted run bit for bit."""
    out_dir = tmp_path / "run"
    partial = train(_config(reference, out_dir), stop_after=4)
    assert partial.final_dir is None and _checkpoint_names(out_dir) == ["step_00000003", "step_00000004"]
    resumed = train(_config(reference, out_dir))
    assert resumed.final_dir is not None and resumed.last_step == STEPS
    assert _losses(out_dir) == _losses(reference["run"])


def test_rerunning_a_finished_run_with_fewer_steps_loses_nothing(reference, tmp_path, capsys) -> None:
    """The issue's case: a 6-step run, then the same command with 3 steps. Before, the 6-step
    model and log were replaced; now the run is continued, and there is nothing left to train."""
    out_dir = tmp_path / "run"
    shutil.copytree(reference["run"], out_dir)
    model_bytes = (out_dir / "final" / "model.safetensors").read_bytes()
    result = train(_config(reference, out_dir, "--train.steps=3"))
    printed = capsys.readouterr().out
    assert "resumed from step 6" in printed and "nothing left to train" in printed
    assert "train.steps 6 -> 3" in printed  # the changed setting is reported
    assert result.last_step == STEPS and result.val_loss == _records(reference["run"])[-1]["val_loss"]
    assert _records(out_dir) == _records(reference["run"])
    assert (out_dir / "final" / "model.safetensors").read_bytes() == model_bytes
    assert _checkpoint_names(out_dir) == _checkpoint_names(reference["run"])


def test_resume_false_refuses_a_run_and_overwrite_replaces_it(reference, tmp_path) -> None:
    out_dir = tmp_path / "run"
    shutil.copytree(reference["run"], out_dir)
    with pytest.raises(
        ConfigError,
        match=rf"train\.out_dir={re.escape(str(out_dir))} already holds a run .*--train\.overwrite=true",
    ):
        train(_config(reference, out_dir, "--train.resume=false"))
    assert _records(out_dir) == _records(reference["run"])  # untouched
    assert _checkpoint_names(out_dir) == ["step_00000003", "step_00000006"]

    old_model = (out_dir / "final" / "model.safetensors").read_bytes()
    result = train(_config(reference, out_dir, "--train.overwrite=true", "--train.steps=2"))
    assert result.last_step == 2
    assert [r["step"] for r in _records(out_dir)] == [1, 2]  # no line of the old log left
    assert _checkpoint_names(out_dir) == ["step_00000002"]  # the old checkpoints are gone
    assert (out_dir / "final" / "model.safetensors").read_bytes() != old_model
    assert json.loads((out_dir / "config.json").read_text())["train"]["steps"] == 2
    assert not (out_dir / ".overwritten").exists()


def test_resume_true_needs_a_checkpoint(reference, tmp_path) -> None:
    out_dir = tmp_path / "empty"
    with pytest.raises(
        ConfigError,
        match=rf"train\.resume=true, but {re.escape(str(out_dir / 'checkpoints'))} holds no checkpoint",
    ):
        train(_config(reference, out_dir, "--train.resume=true"))


def test_auto_refuses_a_run_it_cannot_continue(reference, tmp_path) -> None:
    """A run whose checkpoints were deleted (final/ kept), or none of whose checkpoints loads: "auto"
    neither continues nor starts over on top of it."""
    out_dir = tmp_path / "run"
    shutil.copytree(reference["run"], out_dir)
    shutil.rmtree(out_dir / "checkpoints")
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(out_dir))} holds a run \(final/, metrics\.jsonl\) but .*has no checkpoint",
    ):
        train(_config(reference, out_dir))

    damaged = tmp_path / "damaged"
    shutil.copytree(reference["run"], damaged)
    for path in ckpt.list_checkpoints(damaged / "checkpoints"):
        (path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(
        ConfigError, match=rf"no checkpoint in {re.escape(str(damaged / 'checkpoints'))} loads"
    ):
        train(_config(reference, damaged))
    assert _records(damaged) == _records(reference["run"])


def test_checkpoint_of_another_model_shape_is_named(reference, tmp_path) -> None:
    out_dir = _copy_until(reference["run"], tmp_path / "run", 3)
    checkpoint = out_dir / "checkpoints" / "step_00000003"
    with pytest.raises(
        ConfigError,
        match=rf"{re.escape(str(checkpoint))} holds a model of another shape: model\.dim=64 there, 32 here",
    ):
        train(_config(reference, out_dir, "--model.dim=32"))
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts=4 there, 8 here"):
        train(_config(reference, out_dir, "--train.resume=true", "--model.moe.num_experts=8"))


def _as_if_written_by_ep2(out_dir: Path) -> None:
    """Rewrite the step-3 checkpoint's saved config as a 2-rank ep=2 job with the same global batch
    would have saved it: batch_size=1 x grad_accum_steps=2 x 2 data-parallel ranks."""
    state_path = out_dir / "checkpoints" / "step_00000003" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["train"]["grad_accum_steps"] = 2
    state["config"]["parallel"].update(dp_shard=2, ep=2)
    state["world_size"] = 2  # as torch.distributed.checkpoint's state.json records it
    state_path.write_text(json.dumps(state))


def test_resuming_under_another_layout_keeps_the_global_batch(reference, tmp_path, capsys) -> None:
    """The ep=2 job's command (grad_accum_steps=2), run by one process: grad_accum_steps becomes 4,
    so steps 4-6 are the reference's, bit for bit (before, the global batch silently halved)."""
    out_dir = _copy_until(reference["run"], tmp_path / "run", 3)
    _as_if_written_by_ep2(out_dir)
    result = train(_config(reference, out_dir, "--train.grad_accum_steps=2"))
    assert "keeping the checkpoint's global batch of 4 sequences: train.grad_accum_steps=4 (was 2)" in (
        capsys.readouterr().out
    )
    assert result.final_dir is not None
    assert _losses(out_dir) == _losses(reference["run"])
    assert json.loads((out_dir / "config.json").read_text())["train"]["grad_accum_steps"] == 4


def test_a_global_batch_that_cannot_be_kept_is_an_error(reference, tmp_path) -> None:
    out_dir = _copy_until(reference["run"], tmp_path / "run", 3)
    _as_if_written_by_ep2(out_dir)
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps=3 differs from the checkpoint's 2") as e:
        train(_config(reference, out_dir, "--train.grad_accum_steps=3"))
    message = str(e.value)
    assert "its global batch is 4 sequences" in message and "this run's would be 3" in message
    assert "parallel.dp_replicate" in message and "parallel.dp_shard" in message
    with pytest.raises(
        ConfigError, match=r"no whole train\.grad_accum_steps keeps it \(4 is not a multiple of 3\)"
    ):
        train(_config(reference, out_dir, "--train.batch_size=3", "--train.grad_accum_steps=2"))
    assert _checkpoint_names(out_dir) == ["step_00000003"]  # nothing was written


def test_overwrite_removes_only_run_outputs_and_finishes_a_killed_one(tmp_path) -> None:
    out_dir = tmp_path / "run"
    for name in ("checkpoints/step_00000002", "final", "data", ".overwritten/final"):
        (out_dir / name).mkdir(parents=True)  # .overwritten: left by an overwrite that was killed
    for name in ("metrics.jsonl", "loss.png", "config.json", "notes.txt"):
        (out_dir / name).write_text("x")
    clear_previous_run(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["data", "notes.txt"]
