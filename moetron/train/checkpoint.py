"""Training checkpoints: atomic, self-validating, no pickles.

Layout: <out_dir>/checkpoints/step_00000200/
    model.safetensors      fp32 weights (moetron names)
    optimizer.safetensors  AdamW moments, keyed "<param index>.<name>"
    rng.safetensors        torch RNG state
    state.json             step, loader position, optimizer param groups, resolved config

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place (and the parent fsynced): a save killed at any moment leaves either no new checkpoint or a
complete one, never one that looks valid but is not. Loading verifies every file parses.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "step_"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (full disk, permissions...); earlier checkpoints are intact."""


@dataclass
class TrainingState:
    step: int
    loader: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written, fsynced checkpoint directory visible under its final name: after a
    crash either the old state or the whole new checkpoint exists, never half of one."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
) -> Path:
    """Atomically write checkpoint `step` under `directory`, then keep only the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model_tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
        save_file(model_tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        body = {
            "step": step,
            "loader": state.loader,
            "config": state.config,
            "extra": state.extra,
            "optimizer": opt_meta,
        }
        (tmp / "state.json").write_text(json.dumps(body, indent=1))
        for name in FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        publish(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            f"could not write checkpoint for step {step} in {directory}: {e.strerror or e}; "
            "earlier checkpoints are untouched"
        ) from e
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f".tmp-{PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary ones are never listed)."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore model, optimizer and RNG from `path`; raises ValueError if any file is unreadable."""
    try:
        body = json.loads((path / "state.json").read_text())
        model_tensors = load_file(path / "model.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")["torch"]
    except Exception as e:  # truncated/corrupt files surface as several exception types
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from None
    missing, unexpected = model.load_state_dict(model_tensors, strict=False)
    tied = (
        {"output.weight"}
        if "output.weight" in missing and "tok_embeddings.weight" in model_tensors
        else set()
    )
    # Checkpoints from before bias balancing have no router bias: theirs was zero, as the model's is
    # until it trains (model.init_weights zeroes it; a resumed run starts from the loaded weights).
    predating_bias = {name for name in missing if name.endswith(".router.expert_bias")}
    for name in predating_bias:
        model.get_buffer(name).zero_()
    if set(missing) - tied - predating_bias or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in opt_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in body["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": body["optimizer"]["param_groups"]})
    torch.set_rng_state(rng)
    return TrainingState(step=body["step"], loader=body["loader"], config=body["config"], extra=body["extra"])


def load_latest(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState | None:
    """Resume from the newest checkpoint that loads; a damaged newer one is reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, model, optimizer)
        except ValueError as e:
            print(f"[checkpoint] skipping {path.name}: {e}")
    return None
