"""torchrun worker: a few optimizer steps of a tiny MoE model under pipeline parallelism, checked
against single-process gradient accumulation over the same microbatches (run on rank 0).

    torchrun --nproc_per_node=2 tests/dist/pipeline_step.py --out result.json

Rank 0 writes the per-step losses of both runs and the largest relative differences of the first
step's gradients and of the final weights; tests/test_distributed_pipeline.py asserts on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh


from moetron.config import ModelConfig, MoEConfig
from moetron.model.transformer import Transformer
from moetron.parallel.pipeline import build_pipeline


def tiny_config(num_layers: int) -> ModelConfig:
    # Strong router losses so a wrong router_loss_scale shows in the gradients.
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_hidden_dim=24,
        num_dense_layers=1,
        aux_loss_weight=0.1,
        z_loss_weight=0.01,
    )
    return ModelConfig(vocab_size=64, dim=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, moe=moe)


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


def batches(steps: int, batch_size: int, seq_len: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def reference(
    model: Transformer, data: list, num_microbatches: int, lr: float
) -> tuple[list, dict, dict, float]:
    """Single process: gradient accumulation over the same contiguous microbatches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for layer in model.moe_layers():
        layer.router_loss_scale = 1.0 / num_microbatches
    losses, first_grads = [], {}
    for step, (inputs_BT, targets_BT) in enumerate(data):
        total = 0.0
        for x, y in zip(inputs_BT.chunk(num_microbatches), targets_BT.chunk(num_microbatches), strict=True):
            loss = cross_entropy(model(x), y)
            (loss / num_microbatches).backward()
            total += float(loss.detach()) / num_microbatches
        losses.append(total)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        eval_loss = float(cross_entropy(model(data[0][0]), data[0][1]))
    return losses, first_grads, {n: p.detach().clone() for n, p in model.named_parameters()}, eval_loss


def max_rel_diff(ours: dict, ref: dict) -> float:
    if set(ours) != set(ref):
        raise AssertionError(f"parameter names differ: {sorted(set(ours) ^ set(ref))}")
    return max(float((ours[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref)


def run_schedule(schedule: str, args: argparse.Namespace, rank: int, world: int) -> dict | None:
    pp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    stages_per_rank = 2 if schedule == "interleaved_1f1b" else 1
    torch.manual_seed(0)
    model = Transformer.from_config(tiny_config(args.layers))
    model.train()
    ref_model = copy.deepcopy(model) if rank == 0 else None
    data = batches(args.steps, batch_size=8, seq_len=16, vocab=model.cfg.vocab_size)
    lr = 1e-2

    pipe = build_pipeline(model, pp_mesh, schedule, args.microbatches, cross_entropy, stages_per_rank)
    params = [p for part in pipe.model_parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    pp_losses, first_grads = [], {}
    for step, (inputs_BT, targets_BT) in enumerate(data):
        pp_losses.append(pipe.step(inputs_BT, targets_BT, broadcast=True))
        if step == 0:
            first_grads = {n: p.grad.clone() for part in pipe.model_parts for n, p in part.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n: p.detach().clone() for part in pipe.model_parts for n, p in part.named_parameters()}
    for part in pipe.model_parts:
        part.eval()
    eval_loss = pipe.evaluate(*data[0], broadcast=True)

    gathered = [None] * world if rank == 0 else None
    dist.gather_object((first_grads, weights, len(pipe.model_parts)), gathered, dst=0)
    if rank != 0:
        return None
    all_grads = {k: v for g, _, _ in gathered for k, v in g.items()}
    all_weights = {k: v for _, w, _ in gathered for k, v in w.items()}
    ref_losses, ref_grads, ref_weights, ref_eval_loss = reference(ref_model, data, args.microbatches, lr)
    return {
        "pp_losses": pp_losses,
        "ref_losses": ref_losses,
        "grad_rel_diff": max_rel_diff(all_grads, ref_grads),
        "weight_rel_diff": max_rel_diff(all_weights, ref_weights),
        "parts_per_rank": [n for _, _, n in gathered],
        "eval_loss": eval_loss,
        "ref_eval_loss": ref_eval_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {schedule: run_schedule(schedule, args, rank, world) for schedule in args.schedules.split(",")}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    from harness import exit_rank  # here, not at the top: tests import this file as a module too

    exit_rank()


if __name__ == "__main__":
    main()
