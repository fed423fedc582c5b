"""Distributed checkpoints (torch.distributed.checkpoint): resharding across layouts, optimizer
state, loader state and RNG included; damaged and unfinished checkpoints skipped."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetron.parallel.pipeline import split_stage
from moetron.train.dcp_checkpoint import (
    export_full_state_dict,
    list_dcp_checkpoints,
    load_latest_dcp,
    save_dcp,
)
from moetron.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dcp_reshard", ROOT / "tests" / "dist" / "dcp_reshard.py")
shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared)


_spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "dist" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_weights_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float) -> None:
    assert set(ours) == set(ref)
    for name in ref:
        diff = float((ours[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))  # a zero bias
        assert diff <= rel, f"{name}: relative difference {diff:.2e}"


def continue_from(directory: Path) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Load the newest checkpoint under `directory` into a fresh single-process model and optimizer
    (different initial weights), then train to LAST_STEP. Returns losses, weights, an RNG draw."""
    model = shared.new_model(seed=99)
    optimizer = build_optimizer(model, shared.TRAIN)
    state = load_latest_dcp(directory, [model], optimizer)
    assert state is not None and state.step == shared.SAVE_STEP
    assert state.loader == {"next_step": shared.SAVE_STEP + 1}
    draw = torch.rand(4).tolist()
    losses = [
        shared.single_process_step(model, optimizer, s) for s in range(state.step + 1, shared.LAST_STEP + 1)
    ]
    return losses, weights(model), draw


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted single-process run, saving (one process, no process group) at SAVE_STEP."""
    work = tmp_path_factory.mktemp("dcp")
    model = shared.new_model(seed=0)
    optimizer = build_optimizer(model, shared.TRAIN)
    losses = [shared.single_process_step(model, optimizer, s) for s in range(1, shared.SAVE_STEP + 1)]
    save_dcp(work / "single", shared.SAVE_STEP, [model], optimizer, shared.state_at(shared.SAVE_STEP), keep=2)
    saved_weights = weights(model)
    draw = torch.rand(4).tolist()
    losses += [
        shared.single_process_step(model, optimizer, s)
        for s in range(shared.SAVE_STEP + 1, shared.LAST_STEP + 1)
    ]
    return {
        "work": work,
        "losses": losses,
        "weights": weights(model),
        "saved_weights": saved_weights,
        "rng_draw": draw,
    }


def test_single_process_round_trip_restores_everything(reference: dict) -> None:
    losses, final, draw = continue_from(reference["work"] / "single")
    assert losses == reference["losses"][shared.SAVE_STEP :]  # same process layout: bit-exact
    assert draw == reference["rng_draw"]
    assert_weights_close(final, reference["weights"], rel=0.0)


def test_damaged_newest_checkpoint_and_unfinished_save_are_skipped(tmp_path: Path, capsys) -> None:
    model = shared.new_model(seed=0)
    optimizer = build_optimizer(model, shared.TRAIN)
    saved = {}
    for step in (1, 2, 3):
        shared.single_process_step(model, optimizer, step)
        save_dcp(tmp_path, step, [model], optimizer, shared.state_at(step), keep=5)
        saved[step] = weights(model)
    step2, step3 = list_dcp_checkpoints(tmp_path)[1:]
    shard = next(step3.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated by a full disk
    metadata = step2 / ".metadata"
    metadata.write_bytes(bytes(metadata.stat().st_size))  # same size, unreadable: DCP itself fails
    (tmp_path / "step_00000004.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "step_00000004.tmp" / ".metadata").write_bytes(b"partial")

    fresh = shared.new_model(seed=99)
    state = load_latest_dcp(tmp_path, [fresh], build_optimizer(fresh, shared.TRAIN))
    assert state is not None and state.step == 1
    assert_weights_close(weights(fresh), saved[1], rel=0.0)
    out = capsys.readouterr().out
    assert "skipping step_00000003" in out and "skipping step_00000002" in out

    # The next save removes the unfinished one and prunes to `keep`.
    save_dcp(tmp_path, 5, [fresh], build_optimizer(fresh, shared.TRAIN), shared.state_at(5), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000005"]


def test_two_stages_of_one_rank_save_under_the_whole_models_names(tmp_path: Path) -> None:
    """Interleaved schedules give a rank several stages and one optimizer over all of them."""
    reference = shared.new_model(seed=0)
    ref_optimizer = build_optimizer(reference, shared.TRAIN)
    shared.single_process_step(reference, ref_optimizer, 1)

    model = shared.new_model(seed=0)
    parts = [split_stage(copy.deepcopy(model), stage, 2) for stage in range(2)]
    optimizer = build_optimizer(torch.nn.ModuleList(parts), shared.TRAIN)
    chained = torch.nn.Sequential(*parts)
    chained.moe_layers = lambda: (layer for part in parts for layer in part.moe_layers())
    shared.single_process_step(chained, optimizer, 1)
    save_dcp(tmp_path, 1, parts, optimizer, shared.state_at(1), keep=1)
    assert_weights_close(export_full_state_dict(parts), weights(reference), rel=0.0)

    whole = shared.new_model(seed=99)
    whole_optimizer = build_optimizer(whole, shared.TRAIN)
    assert load_latest_dcp(tmp_path, [whole], whole_optimizer).step == 1
    assert_weights_close(weights(whole), weights(reference), rel=0.0)
    ref_params, params = dict(reference.named_parameters()), dict(whole.named_parameters())
    for name, param in ref_params.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(
                whole_optimizer.state[params[name]][key], ref_optimizer.state[param][key]
            )


def test_resumed_optimizer_keeps_its_own_kernel_choice(tmp_path: Path) -> None:
    """A sharded job's optimizer runs the foreach AdamW (DTensors) and its checkpoint's param groups
    say so; one process resuming from it keeps build_optimizer's fused AdamW, with the saved moments."""
    from moetron.config import Config, ModelConfig
    from moetron.parallel.mesh import ParallelDims
    from moetron.train import checkpoint_io
    from moetron.train.distributed import DistContext

    model = shared.new_model(seed=0)
    foreach = torch.optim.AdamW(model.parameters(), lr=shared.TRAIN.lr, fused=False, foreach=True)
    shared.single_process_step(model, foreach, 1)
    save_dcp(tmp_path, 1, [model], foreach, shared.state_at(1), keep=1)

    fresh = shared.new_model(seed=99)
    optimizer = build_optimizer(fresh, shared.TRAIN)
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]
    cfg = Config(model=ModelConfig())
    ctx = DistContext(ParallelDims.from_config(cfg.parallel, 1), None)
    assert checkpoint_io.load_latest(tmp_path, cfg, [fresh], optimizer, ctx).step == 1
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)
    for loaded, saved in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(optimizer.state[loaded]["exp_avg"], foreach.state[saved]["exp_avg"])


def test_nothing_to_load_returns_none(tmp_path: Path) -> None:
    model = shared.new_model(seed=0)
    assert load_latest_dcp(tmp_path / "absent", [model], build_optimizer(model, shared.TRAIN)) is None


@pytest.mark.distributed
def test_checkpoints_reshard_between_one_process_fsdp_pp_and_ep(reference: dict) -> None:
    work = reference["work"]
    harness.torchrun(2, [str(ROOT / "tests" / "dist" / "dcp_reshard.py"), "--work", str(work)], timeout=300)
    result = json.loads((work / "result.json").read_text())
    ref_losses = reference["losses"]

    # (a) one process -> FSDP dp_shard=2: same continuation, RNG and loader state restored.
    fsdp = result["fsdp_load"]
    assert fsdp["resumed_step"] == shared.SAVE_STEP and fsdp["loader"] == {"next_step": shared.SAVE_STEP + 1}
    assert fsdp["rng_draw"] == reference["rng_draw"]
    assert fsdp["losses"] == pytest.approx(ref_losses[shared.SAVE_STEP :], rel=1e-5)
    # ... and the full weights gathered from the FSDP shards (the HF export's input) match.
    assert_weights_close(load_file(work / "fsdp_final.safetensors"), reference["weights"], rel=1e-5)

    # (b) pp=2 and dp_shard=2 x ep=2 -> one process: the continuation matches the uninterrupted run.
    for layout in ("pp", "ep"):
        saved = result[f"{layout}_save"]
        assert saved["losses"] == pytest.approx(ref_losses[: shared.SAVE_STEP], rel=1e-5), layout
        exported = load_file(work / f"{layout}_export.safetensors")  # gathered from all stages / shards
        assert_weights_close(exported, reference["saved_weights"], rel=1e-5)
        losses, final, _ = continue_from(work / layout)
        assert losses == pytest.approx(ref_losses[shared.SAVE_STEP :], rel=1e-5), layout
        assert_weights_close(final, reference["weights"], rel=1e-5)
    assert "norm.weight" not in result["pp_save"]["names"]  # rank 0 really held only its stage
    assert result["ep_save"]["local_experts"] == 2  # of 4: the experts really were split
