"""Distributed training checkpoints with `torch.distributed.checkpoint` (DCP): saved under one
layout, loaded under any other (FSDP / TP / EP DTensors, pipeline stages, or one process without a
process group), optimizer state included.

Layout: <out_dir>/checkpoints/step_00000200/
    .metadata, __<rank>_0.distcp   DCP: model and AdamW state keyed by the single-process names
                                   ("model.layers.3.attention.wq.weight", "optim.state.….exp_avg")
    state.json                     step, loader position, config, torch RNG state, and the byte size
                                   of every file above (written last, by rank 0)

Every rank writes into step_N.tmp; after a barrier rank 0 writes state.json, fsyncs, and renames the
directory into place, so a job killed mid-save leaves a .tmp that is never listed (and is removed by
the next save). Loading checks state.json and the recorded file sizes before handing the files to
DCP, and falls back to an older checkpoint (the same one on every rank) if anything is missing,
truncated or unreadable. The directory must be on a filesystem every rank sees.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from moetron.train.checkpoint import CheckpointSaveError, TrainingState, publish

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
STATE_FILE = "state.json"
# Optimizer state keyed by parameter name, not by position in the optimizer: positions differ
# between layouts (pipeline stages hold different parameters), names do not.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_ranks_ok(ok: bool) -> bool:
    """True iff `ok` on every rank, so that all ranks take the same branch."""
    if not _distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag)
    return int(flag) == 0


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """One process without a process group is an intended layout here, not a mistake to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def state_dict_view(model_parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names are the single-process model's, over all parts of this
    rank (pipeline stages hold disjoint `layers.<i>` and the embedding/head of their end).
    get_state_dict maps optimizer entries to names through it, so it must see every part."""
    if len(model_parts) == 1:
        return model_parts[0]
    view = nn.Module()
    for part in model_parts:
        for name, child in part.named_children():
            if child is None or not any(True for _ in child.state_dict(keep_vars=True)):
                continue  # stateless (rope) or removed on this stage
            if name == "layers":
                if "layers" not in view._modules:
                    view.layers = nn.ModuleList()
                for key, block in child.named_children():
                    view.layers.add_module(key, block)
            elif name in view._modules:
                raise ValueError(f"model parts both hold {name!r}; pipeline stages must be disjoint")
            else:
                view.add_module(name, child)
    return view


def _file_sizes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != STATE_FILE}


def save_dcp(
    directory: Path,
    step: int,
    model_parts: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Writes checkpoint `step`, then keeps the newest `keep`.
    The loader state, config and RNG are rank 0's (the loader state is the same on every rank)."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f"{PREFIX}{step:08d}{TMP_SUFFIX}"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(state_dict_view(model_parts), optimizer, options=_OPTIONS)
    error: str | None = None
    try:
        # FileSystemWriter fsyncs each file it writes (sync_files=True by default).
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    except (Exception, CheckpointException) as e:  # DCP re-raises any rank's failure on every rank
        error = str(e)
    _barrier()
    if error is None and _rank() == 0:
        try:
            _finish(directory, tmp, final, step, state)
        except OSError as e:
            error = e.strerror or str(e)
    if not _all_ranks_ok(error is None):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            f"could not write checkpoint for step {step} in {directory}: {error or 'failed on another rank'}; "
            "earlier checkpoints are untouched"
        )
    if _rank() == 0:
        for old in list_dcp_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in directory.glob(f"{PREFIX}*{TMP_SUFFIX}"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _finish(directory: Path, tmp: Path, final: Path, step: int, state: TrainingState) -> None:
    """Rank 0, after every rank's files are on disk: side file, fsync, rename into place."""
    body = {
        "step": step,
        "loader": state.loader,
        "config": state.config,
        "extra": state.extra,
        "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "world_size": dist.get_world_size() if _distributed() else 1,
        "files": _file_sizes(tmp),
    }
    with open(tmp / STATE_FILE, "w") as f:
        f.write(json.dumps(body, indent=1))
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, final)


def list_dcp_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, oldest first (.tmp ones, from unfinished saves, are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _read_side_file(path: Path) -> dict[str, Any]:
    """state.json, after checking that every file it lists is there with its recorded size."""
    body = json.loads((path / STATE_FILE).read_text())
    for name, size in body["files"].items():
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing")
        if (path / name).stat().st_size != size:
            raise ValueError(f"{name} has {(path / name).stat().st_size} bytes, expected {size}")
    if ".metadata" not in body["files"]:
        raise ValueError("no DCP .metadata recorded")
    return body


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Collective. Load the DCP checkpoint at `path` into `model` (a whole model or a
    `state_dict_view` of a rank's parts) and `optimizer`, resharding to their current layout."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state_dict = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state_dict, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state_dict["model"],
        optim_state_dict=state_dict["optim"],
        options=_OPTIONS,
    )


def load_latest_dcp(
    directory: Path, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer
) -> TrainingState | None:
    """Collective. Restore model parts, optimizer and RNG from the newest checkpoint that loads;
    damaged newer ones are reported and skipped. None if there is none."""
    view = state_dict_view(model_parts)
    for path in reversed(list_dcp_checkpoints(Path(directory))):
        body: dict[str, Any] | None = None
        reason = "unreadable on another rank"
        try:
            body = _read_side_file(path)
        except Exception as e:  # missing/corrupt JSON, truncated files: several exception types
            reason = f"{type(e).__name__}: {e}"
        if _all_ranks_ok(body is not None):
            try:
                load_into(view, optimizer, path)
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                body, reason = None, f"{type(e).__name__}: {e}"
            if _all_ranks_ok(body is not None):
                rng = base64.b64decode(body["rng"])
                torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))
                return TrainingState(body["step"], body["loader"], body["config"], body["extra"])
        if _rank() == 0:
            print(f"[checkpoint] skipping {path.name}: {reason[:500]}", flush=True)
    return None


def export_full_state_dict(model_parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Collective. The whole model's weights, unsharded, on CPU, under the single-process names,
    on rank 0 (an empty dict elsewhere): for the HF export from any layout.

    Each DTensor is gathered within its own mesh (FSDP/TP/EP), then the pipeline stages' tensors
    travel to rank 0 (one sender per name, the lowest rank holding it)."""
    local: dict[str, torch.Tensor] = {}
    for part in model_parts:
        for name, tensor in part.state_dict().items():
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()  # collective over the DTensor's mesh, same order on each rank
            local[name] = tensor.detach().cpu()
    if not _distributed():
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    names_per_rank: list[list[str] | None] = [None] * world
    dist.all_gather_object(names_per_rank, sorted(local))
    owner: dict[str, int] = {}
    for source, names in enumerate(names_per_rank):
        for name in names or []:
            owner.setdefault(name, source)
    mine = {name: tensor for name, tensor in local.items() if owner[name] == rank}
    if rank == 0:
        gathered: list[dict[str, torch.Tensor] | None] = [None] * world
        dist.gather_object(mine, gathered, dst=0)
        return {name: t for part in gathered for name, t in (part or {}).items()}
    dist.gather_object(mine, None, dst=0)
    return {}
