"""What a run does with what its out_dir already holds: continue it, start fresh, or refuse.

Decided before anything is written, from train.resume, train.overwrite and out_dir:

    resume   overwrite  out_dir holds                          the run
    "auto"   false      nothing of a run                       starts fresh
    "auto"   false      checkpoints                            continues from the newest valid one
    "auto"   false      metrics.jsonl or final/, no checkpoint refuses: nothing to continue from
    true     false      checkpoints                            continues from the newest valid one
    true     false      no checkpoint                          refuses, naming the directory
    false    false      nothing of a run                       starts fresh
    false    false      checkpoints, metrics.jsonl or final/   refuses, naming train.overwrite
    "auto"/false  true  anything                               removes the old run's outputs, starts fresh
    true     true       -                                      ConfigError when the config loads

"Continues" fails loudly when no checkpoint loads, or when the newest one holds another model shape;
it never falls back to starting over. A restarted attempt of a torchrun job (--max-restarts) whose
first attempt got past these checks continues the job's own run whatever resume/overwrite say:
out_dir holds its own progress (rank 0 marks the start in torchrun's store, which outlives attempts).

Resuming keeps the global batch, batch_size * grad_accum_steps * dp_replicate * dp_shard sequences:
under another layout, a grad_accum_steps left as the checkpoint had it is recomputed to keep it;
one the user changed, or a layout no whole grad_accum_steps fits, is an error.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetron.config import Config, ConfigError, ModelConfig
from moetron.model.transformer import Transformer
from moetron.parallel.mesh import ParallelDims
from moetron.train.checkpoint import list_checkpoints
from moetron.train.distributed import DistContext

# Everything a run writes into out_dir; checkpoints first: once they are gone nothing resumes the old run.
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "loss.png", "expert_load.png", "config.json")
_STARTED_KEY = "moetron/run_started"
_TRASH = ".overwritten"


@dataclass
class SavedRun:
    path: Path  # the newest checkpoint whose state.json reads
    config: dict[str, Any]  # its resolved config
    world_size: int  # processes that wrote it (resolves parallel.dp_shard=-1)


@dataclass
class Start:
    resume: bool  # continue from the newest valid checkpoint
    overwrite: bool = False  # remove the previous run's outputs first
    saved: SavedRun | None = None


def plan_start(cfg: Config, ctx: DistContext) -> Start:
    """The table above, read-only: every rank calls it before rank 0 changes out_dir."""
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    found = list_checkpoints(checkpoint_dir)
    mode, overwrite = tc.resume, tc.overwrite
    restarted = _restart_of_started_run(ctx)
    if restarted and (mode != "auto" or overwrite):
        ctx.log(
            f"[train] elastic restart: continuing this job's run in {out_dir} "
            f"(train.resume={tc.resume}, train.overwrite={tc.overwrite} applied to its first attempt)"
        )
        mode, overwrite = "auto", False
    if overwrite:
        return Start(resume=False, overwrite=True)
    if mode is True and not found:
        raise ConfigError(f"train.resume=true, but {checkpoint_dir} holds no checkpoint to continue from")
    if found and mode is not False:
        return Start(resume=True, saved=read_saved_run(found))
    outputs = previous_outputs(out_dir)
    if not outputs or restarted:  # restarted before its first checkpoint: its own partial log
        return Start(resume=False)
    if mode is False:
        raise ConfigError(
            f"train.out_dir={out_dir} already holds a run ({', '.join(outputs)}) and train.resume=false "
            "starts over: pass --train.overwrite=true to replace it, --train.resume=auto to continue it, "
            "or choose another train.out_dir"
        )
    raise ConfigError(
        f"train.out_dir={out_dir} holds a run ({', '.join(outputs)}) but {checkpoint_dir} has no checkpoint "
        "to continue it from: pass --train.overwrite=true to replace it, or choose another train.out_dir"
    )


def previous_outputs(out_dir: Path) -> list[str]:
    """What a previous run left in out_dir that starting over would destroy (config.json alone is
    not a result: it is written before the first step)."""
    outputs = []
    if num := len(list_checkpoints(out_dir / "checkpoints")):
        outputs.append(f"{num} checkpoint{'s' if num > 1 else ''}")
    if (out_dir / "final").exists():
        outputs.append("final/")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        outputs.append("metrics.jsonl")
    return outputs


def read_saved_run(found: list[Path]) -> SavedRun | None:
    """The resolved config of the newest checkpoint whose state.json reads (both formats write one)."""
    for path in reversed(found):
        try:
            body = json.loads((path / "state.json").read_text())
            return SavedRun(path, body["config"], int(body.get("world_size", 1)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # the loader reports and skips it too
    return None


def clear_previous_run(out_dir: Path) -> None:
    """train.overwrite (rank 0): move the old run's outputs into a hidden directory, checkpoints
    first, then delete it; a kill midway leaves no checkpoint of the old run to resume, and the
    next overwrite finishes the job."""
    trash = out_dir / _TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, trash / name)
    shutil.rmtree(trash)


def mark_started(ctx: DistContext) -> None:
    """Rank 0, once the checks passed: a restarted attempt of this torchrun job continues this run."""
    if ctx.job_store is not None and ctx.is_main:
        ctx.job_store.set(_STARTED_KEY, "1")


def _restart_of_started_run(ctx: DistContext) -> bool:
    if ctx.job_store is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return False
    return ctx.job_store.check([_STARTED_KEY])


def check_resumable(cfg: Config, saved: SavedRun, dp_degree: int, log: Callable[[str], None]) -> None:
    """Before resuming from `saved` (every rank): the same model shape, and the same global batch
    (may set cfg.train.grad_accum_steps); the other changed settings are logged."""
    _check_model_shape(cfg.model, saved)
    _keep_global_batch(cfg, saved, dp_degree, log)
    changed = [
        f"{key} {old!r} -> {new!r}"
        for key, old, new in _differences(saved.config, cfg.to_dict())
        if key not in ("train.resume", "train.overwrite")
    ]
    if changed:
        log(f"[train] resuming with settings changed since {saved.path.name}: {', '.join(changed)}")


def _parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Transformer(model).state_dict().items()}


def _check_model_shape(model: ModelConfig, saved: SavedRun) -> None:
    try:
        saved_model = ModelConfig.from_dict(saved.config["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise ConfigError(f"{saved.path}: its saved model config does not load: {e}") from None
    if _parameter_shapes(saved_model) == _parameter_shapes(model):
        return
    differences = _differences(saved_model.to_dict(), model.to_dict(), "model.")
    fields = ", ".join(f"{key}={old!r} there, {new!r} here" for key, old, new in differences)
    if any(key == "model.vocab_size" for key, _, _ in differences):
        fields += " (model.vocab_size comes from the tokenizer: data.*)"
    raise ConfigError(
        f"{saved.path} holds a model of another shape: {fields}; continue it with its "
        "model settings, or start a new run (another train.out_dir, or --train.overwrite=true)"
    )


def _keep_global_batch(cfg: Config, saved: SavedRun, dp_degree: int, log: Callable[[str], None]) -> None:
    tc, old_train, old_par = cfg.train, saved.config["train"], saved.config["parallel"]
    old_dp = ParallelDims(
        old_par["dp_replicate"], old_par["dp_shard"], old_par["tp"], old_par["ep"], old_par["pp"],
        saved.world_size,
    ).dp_degree  # fmt: skip
    old_batch, old_accum = old_train["batch_size"], old_train["grad_accum_steps"]
    old_global = old_batch * old_accum * old_dp
    per_accum_step = tc.batch_size * dp_degree
    new_global = per_accum_step * tc.grad_accum_steps
    if new_global == old_global:
        return
    if tc.grad_accum_steps == old_accum and old_global % per_accum_step == 0:
        tc.grad_accum_steps = old_global // per_accum_step
        log(
            f"[train] keeping the checkpoint's global batch of {old_global} sequences: "
            f"train.grad_accum_steps={tc.grad_accum_steps} (was {old_accum}) with train.batch_size="
            f"{tc.batch_size} on {dp_degree} data-parallel rank{'s' if dp_degree > 1 else ''}"
        )
        return
    reason = (
        f"train.grad_accum_steps={tc.grad_accum_steps} differs from the checkpoint's {old_accum}"
        if tc.grad_accum_steps != old_accum
        else f"no whole train.grad_accum_steps keeps it ({old_global} is not a multiple of {per_accum_step})"
    )
    raise ConfigError(
        f"resuming {saved.path}: its global batch is {old_global} sequences (train.batch_size={old_batch} "
        f"x train.grad_accum_steps={old_accum} x {old_dp} data-parallel ranks), this run's would be "
        f"{new_global} (train.batch_size={tc.batch_size} x train.grad_accum_steps={tc.grad_accum_steps} x "
        f"{dp_degree} = parallel.dp_replicate x parallel.dp_shard); {reason}. Choose train.batch_size, "
        f"train.grad_accum_steps and parallel.dp_replicate / parallel.dp_shard that multiply to {old_global}"
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix.rstrip("."), old, new)]
    return [
        diff
        for key in sorted(old.keys() | new.keys())
        for diff in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    ]
