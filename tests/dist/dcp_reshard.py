"""Distributed checkpoints across layouts: shared pieces for tests/test_distributed_dcp.py and a
torchrun worker (2 processes, gloo) that
  fsdp_load: loads a checkpoint written by ONE process (no process group) under FSDP dp_shard=2
             and continues training;
  pp_save:   trains with pp=2 (1F1B) and saves;
  ep_save:   trains with dp_shard=2 x ep=2 (experts split over the two ranks) and saves.

    torchrun --nproc_per_node=2 tests/dist/dcp_reshard.py --work DIR

Every layout consumes the same global batch per step, cut into the same two halves: one process
accumulates gradients over them, data-parallel ranks take one half each, pipeline stages run them
as two microbatches; so all layouts compute the same losses and updates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


from moetron.config import ModelConfig, MoEConfig, TrainConfig
from moetron.model.transformer import Transformer
from moetron.train.checkpoint import TrainingState
from moetron.train.dcp_checkpoint import export_full_state_dict, load_latest_dcp, save_dcp
from moetron.train.optim import build_optimizer

SAVE_STEP, LAST_STEP, HALVES = 2, 4, 2
TRAIN = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0)


def tiny_config() -> ModelConfig:
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_hidden_dim=24,
        num_dense_layers=1,
        aux_loss_weight=0.1,
        z_loss_weight=0.01,
    )
    return ModelConfig(vocab_size=64, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, moe=moe)


def new_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer.from_config(tiny_config())
    model.train()
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of 1-based `step`: 8 sequences of 16 tokens (a stand-in for the loader)."""
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1000 + step))
    return tokens[:, :-1], tokens[:, 1:]


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


def single_process_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    """Gradient accumulation over the two halves of the global batch."""
    for layer in model.moe_layers():
        layer.router_loss_scale = 1.0 / HALVES
    inputs_BT, targets_BT = batch(step)
    total = 0.0
    for x, y in zip(inputs_BT.chunk(HALVES), targets_BT.chunk(HALVES), strict=True):
        loss = cross_entropy(model(x), y)
        (loss / HALVES).backward()
        total += float(loss.detach()) / HALVES
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def data_parallel_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    """Each of the two data-parallel ranks takes one half; FSDP averages the gradients."""
    inputs_BT, targets_BT = batch(step)
    rank = dist.get_rank()
    loss = cross_entropy(model(inputs_BT.chunk(HALVES)[rank]), targets_BT.chunk(HALVES)[rank])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size()


def state_at(step: int) -> TrainingState:
    return TrainingState(step=step, loader={"next_step": step + 1}, config=tiny_config().to_dict(), extra={})


def export(path: Path, model_parts: list[nn.Module]) -> None:
    full = export_full_state_dict(model_parts)  # collective
    if dist.get_rank() == 0:
        save_file(full, path)
    else:
        assert full == {}


def fsdp_load(work: Path) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from moetron.parallel.fsdp import apply_fsdp
    from moetron.parallel.mesh import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=1, ep=1, pp=1, world_size=2)
    mesh = dims.build_mesh("cpu")
    model = new_model(seed=99)  # different weights: the checkpoint must overwrite all of them
    apply_fsdp(model, mesh["dp_shard"], mp_policy=MixedPrecisionPolicy())
    optimizer = build_optimizer(model, TRAIN)
    state = load_latest_dcp(work / "single", [model], optimizer)
    rng_draw = torch.rand(4).tolist()  # restored RNG: the same numbers as the uninterrupted run
    losses = [data_parallel_step(model, optimizer, step) for step in range(state.step + 1, LAST_STEP + 1)]
    export(work / "fsdp_final.safetensors", [model])
    return {"resumed_step": state.step, "loader": state.loader, "rng_draw": rng_draw, "losses": losses}


def pp_save(work: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from moetron.parallel.pipeline import build_pipeline

    pp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    pipe = build_pipeline(new_model(seed=0), pp_mesh, "1f1b", HALVES, cross_entropy)
    (part,) = pipe.model_parts
    optimizer = build_optimizer(part, TRAIN)
    losses = []
    for step in range(1, SAVE_STEP + 1):
        losses.append(pipe.step(*batch(step), broadcast=True))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_dcp(work / "pp", SAVE_STEP, pipe.model_parts, optimizer, state_at(SAVE_STEP), keep=2)
    export(work / "pp_export.safetensors", pipe.model_parts)
    return {"losses": losses, "names": sorted(part.state_dict())}


def ep_save(work: Path) -> dict:
    from moetron.parallel.mesh import ParallelDims
    from moetron.parallel.parallelize import parallelize

    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=1, ep=2, pp=1, world_size=2)
    mesh = dims.build_mesh("cpu")
    model = new_model(seed=0)
    parallelize(model, dims, mesh, TRAIN)
    local_experts = model.layers[1].ffn.experts.w1.to_local().shape[0]
    optimizer = build_optimizer(model, TRAIN)
    losses = [data_parallel_step(model, optimizer, step) for step in range(1, SAVE_STEP + 1)]
    save_dcp(work / "ep", SAVE_STEP, [model], optimizer, state_at(SAVE_STEP), keep=2)
    export(work / "ep_export.safetensors", [model])
    return {"losses": losses, "local_experts": local_experts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--modes", default="fsdp_load,pp_save,ep_save")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    modes = {"fsdp_load": fsdp_load, "pp_save": pp_save, "ep_save": ep_save}
    results = {mode: modes[mode](args.work) for mode in args.modes.split(",")}
    if dist.get_rank() == 0:
        (args.work / "result.json").write_text(json.dumps(results))
    dist.barrier()
    from harness import exit_rank  # here, not at the top: tests import this file as a module too

    exit_rank()


if __name__ == "__main__":
    main()
