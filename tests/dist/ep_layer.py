"""Expert parallelism against one process; run by tests/test_distributed_ep.py under torchrun (gloo).

Usage: torchrun --standalone --nproc_per_node=P tests/dist/ep_layer.py CHECKPOINT_DIR

Every rank builds the same model from the same seed and computes the single-process reference
itself: each rank's share of the batch is run through the reference in turn with gradients
accumulated, i.e. the data-parallel objective with the router losses over each rank's own tokens.
Then it applies expert parallelism to a copy, runs only its share and compares outputs, input
gradients and parameter gradients (expert weights gathered from their shards, replicated ones
summed over ranks) with the reference: max|a - b| / max|b| <= 1e-5 in fp32.

Cases (ep = P, 2 experts per rank):
  layer/random, layer/capacity (token dropping), layer/local_only (no row crosses ranks: each rank
  receives zero rows from the others), layer/all_to_rank0 (every rank > 0 receives zero rows);
  model: a 2-layer Transformer, one SGD step, DCP save of the sharded model and a no-dist load of
  it into a plain model on rank 0;
  fsdp: ep=2 with FSDP over mesh.py's axes (dp_shard = dp_shard_mod_ep × ep), `fully_shard_experts`.
Prints the measured all-to-all time per training step (profiler, rough).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module


from moetron.config import ModelConfig
from moetron.model.moe import MoELayer
from moetron.model.transformer import Transformer
from moetron.parallel.expert_parallel import ExpertParallel, apply_ep, fully_shard_experts

TOL = 1e-5
DIM, TOKENS_PER_RANK = 16, 12


def check(case: str, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    if actual.shape != expected.shape:
        raise AssertionError(f"{case}: {name} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not error <= TOL:
        raise AssertionError(f"{case}: {name} relative error {error:.2e} > {TOL:.0e}")


def summed_grad(param: torch.Tensor) -> torch.Tensor:
    """A replicated parameter's gradient summed over ranks (what data parallelism would apply)."""
    grad = param.grad.clone()
    dist.all_reduce(grad)
    return grad


def model_config(world: int, **moe: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        dim=DIM,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=32,
        moe={"num_experts": 2 * world, "top_k": 2, "expert_hidden_dim": 24, "num_shared_experts": 1, **moe},
    )


def steer_router(layer: MoELayer, world: int) -> torch.Tensor:
    """Make expert e's gate row point along direction owner(e) (one orthonormal direction per ep
    rank), so a row along direction p is routed to rank p's two experts. Returns the directions."""
    directions_PD = torch.linalg.qr(torch.randn(DIM, world))[0].T
    owner_E = torch.arange(layer.cfg.num_experts) // (layer.cfg.num_experts // world)
    with torch.no_grad():
        layer.router.gate.weight.copy_(4 * directions_PD[owner_E] + 0.05 * torch.randn(len(owner_E), DIM))
    return directions_PD


def layer_case(case: str, rank: int, world: int, ep_mesh) -> None:
    torch.manual_seed(1)
    capacity = 1.0 if case == "capacity" else None
    reference = MoELayer(model_config(world, capacity_factor=capacity))
    reference.init_weights(std=0.3, out_std=0.2)
    x_PTD = torch.randn(world, TOKENS_PER_RANK, DIM)
    if case in ("local_only", "all_to_rank0"):
        directions_PD = steer_router(reference, world)
        target_P = torch.arange(world) if case == "local_only" else torch.zeros(world, dtype=torch.long)
        x_PTD = 2 * directions_PD[target_P, None, :] + 0.1 * x_PTD
    grad_out_PTD = torch.randn(world, TOKENS_PER_RANK, DIM)
    layer = copy.deepcopy(reference)
    reference.train()
    layer.train()

    # Reference: one process, every rank's tokens in turn (router losses per rank, as under DP).
    out_ref, x_grad_ref, counts_ref = [], [], []
    for p in range(world):
        x = x_PTD[p].clone().requires_grad_()
        reference.tokens_per_expert.zero_()
        out = reference(x[None])[0]
        (out * grad_out_PTD[p]).sum().backward()
        out_ref.append(out.detach())
        x_grad_ref.append(x.grad)
        counts_ref.append(reference.tokens_per_expert.clone())

    # The routing really is what the case says (else the case tests nothing special).
    local_experts = layer.cfg.num_experts // world
    owner_E = torch.arange(layer.cfg.num_experts) // local_experts
    for p, counts_E in enumerate(counts_ref):
        receivers = set(owner_E[counts_E > 0].tolist())
        expected = {"local_only": {p}, "all_to_rank0": {0}}.get(case, set(range(world)))
        assert receivers == expected, f"{case}: share {p} routed to ranks {receivers}, expected {expected}"
    if case == "capacity":
        assert sum(c.sum() for c in counts_ref) < world * TOKENS_PER_RANK * 2, "capacity drops tokens"

    parallelize_module(layer.experts, ep_mesh, ExpertParallel())
    assert layer.experts.w1.to_local().shape[0] == local_experts, "each rank holds E/ep experts"
    assert layer.experts.w1.shape == reference.experts.w1.shape, "DTensor keeps the global shape"
    x = x_PTD[rank].clone().requires_grad_()
    out = layer(x[None])[0]
    (out * grad_out_PTD[rank]).sum().backward()

    check(case, "output", out, out_ref[rank])
    check(case, "input grad", x.grad, x_grad_ref[rank])
    if not torch.equal(layer.tokens_per_expert, counts_ref[rank]):
        raise AssertionError(f"{case}: tokens_per_expert {layer.tokens_per_expert} != {counts_ref[rank]}")
    for name in ("w1", "w2", "w3"):
        check(
            case,
            f"experts.{name} grad",
            getattr(layer.experts, name).grad,
            getattr(reference.experts, name).grad,
        )
    check(case, "gate grad", summed_grad(layer.router.gate.weight), reference.router.gate.weight.grad)
    for name, param in layer.shared_experts.named_parameters():
        check(
            case, f"shared {name} grad", summed_grad(param), reference.shared_experts.get_parameter(name).grad
        )
    if case == "all_to_rank0" and rank > 0:
        assert layer.experts.w1.grad.to_local().abs().max() == 0, "no rows: zero (not None) gradient"


def lm_loss(model: Transformer, tokens_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV = model(tokens_BT[:, :-1])
    return F.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT[:, 1:].flatten())


def model_case(rank: int, world: int, ep_mesh, checkpoint_dir: str) -> float:
    """EP Transformer: grads, one SGD step, DCP save; rank 0 loads it into a plain model. Returns the
    profiled all-to-all seconds per training step."""
    torch.manual_seed(2)
    cfg = model_config(world)
    reference = Transformer.from_config(cfg)
    model = copy.deepcopy(reference)
    tokens_PBT = torch.randint(0, cfg.vocab_size, (world, 2, 9))
    for p in range(world):
        lm_loss(reference, tokens_PBT[p]).backward()

    apply_ep(model, ep_mesh)
    loss = lm_loss(model, tokens_PBT[rank])
    loss.backward()
    for name, param in model.named_parameters():
        expected = reference.get_parameter(name).grad
        grad = param.grad if isinstance(param, DTensor) else summed_grad(param)
        check("model", f"{name} grad", grad, expected)
        param.grad = grad  # expert gradients are complete already: the all-to-all summed them
    for module in (reference, model):
        torch.optim.SGD(module.parameters(), lr=0.5).step()

    state = get_model_state_dict(model)
    expert_keys = [k for k, v in state.items() if isinstance(v, DTensor)]
    assert len(expert_keys) == 3 * cfg.num_layers, f"expert DTensors in the state dict: {expert_keys}"
    for key in expert_keys:
        assert state[key].shape == reference.state_dict()[key].shape, f"{key}: global shape in state dict"
    dcp.save(state, checkpoint_id=checkpoint_dir)
    dist.barrier()
    if rank == 0:
        plain = Transformer.from_config(cfg)
        loaded = plain.state_dict()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(loaded, checkpoint_id=checkpoint_dir, no_dist=True)
        for key, value in reference.state_dict().items():
            check("model", f"{key} after step, saved under ep and loaded in one process", loaded[key], value)

    # All-to-all time per training step (fwd + bwd; gloo on CPU, so wall time of the calls).
    model.zero_grad()
    lm_loss(model, tokens_PBT[rank]).backward()  # warm-up
    steps = 5
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            lm_loss(model, tokens_PBT[rank]).backward()
        step_s = (time.perf_counter() - start) / steps
    # Self times (no double counting) of the all-to-all ops, gloo's alltoall_base_ under them and the
    # waits for their results (which include waiting for the slower peer).
    comm_us = sum(
        e.self_cpu_time_total
        for e in prof.key_averages()
        if any(name in e.key for name in ("all_to_all", "alltoall", "wait_tensor"))
    )
    return comm_us / 1e6 / steps, step_s


def fsdp_case(rank: int, world: int) -> None:
    """mesh.py's layout: dp_shard = dp_shard_mod_ep × ep; experts FSDP over dp_shard_mod_ep."""
    if world % 2:
        raise ValueError(f"the fsdp case uses ep=2 and needs an even world size, got {world}")
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp_shard_mod_ep", "ep"))
    dp_shard_mesh = mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    torch.manual_seed(3)
    # Two experts, one per ep rank: with dp_shard_mod_ep=2, FSDP shards them on dim 1.
    cfg = model_config(1, top_k=1)
    reference = Transformer.from_config(cfg)
    model = copy.deepcopy(reference)
    tokens_PBT = torch.randint(0, cfg.vocab_size, (world, 2, 9))
    for layer in reference.moe_layers():
        layer.router_loss_scale = 1 / world  # the LM loss's factor, as a trainer sets it
    losses = [lm_loss(reference, tokens_PBT[p]) for p in range(world)]
    (sum(losses) / world).backward()  # FSDP averages over the data-parallel ranks

    apply_ep(model, mesh["ep"])
    fully_shard_experts(model, mesh["dp_shard_mod_ep"], gradient_divide_factor=world)
    for block in model.layers:
        fully_shard(block, mesh=dp_shard_mesh)
    fully_shard(model, mesh=dp_shard_mesh)
    w1 = model.layers[0].ffn.experts.w1  # one expert per ep rank, its rows split over dp_shard_mod_ep
    assert w1.placements[-1] == Shard(0) and w1.to_local().shape == (1, 24 // (world // 2), DIM), w1
    loss = lm_loss(model, tokens_PBT[dp_shard_mesh.get_local_rank()])
    loss.backward()
    check("fsdp", "loss", loss.detach(), losses[dp_shard_mesh.get_local_rank()].detach())
    for name, param in model.named_parameters():
        check("fsdp", f"{name} grad", param.grad, reference.get_parameter(name).grad)


def error_case(world: int, ep_mesh) -> None:
    """Bad input gets a clear error, before any communication."""
    odd = MoELayer(model_config(world, num_experts=2 * world + 1))
    for module, message in ((odd.experts, "not divisible by ep"), (odd.router, "plain GroupedExperts")):
        try:
            parallelize_module(module, ep_mesh, ExpertParallel())
        except (ValueError, TypeError) as error:
            assert message in str(error), error
        else:
            raise AssertionError(f"ExpertParallel accepted {type(module).__name__}: expected {message!r}")


def main() -> None:
    """argv: CHECKPOINT_DIR [CASES...], cases among layer, model, fsdp (default: all)."""
    checkpoint_dir, cases = sys.argv[1], set(sys.argv[2:] or ("layer", "model", "fsdp"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ep_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    error_case(world, ep_mesh)
    passed, report = ["errors"], ""
    if "layer" in cases:
        for case in ("random", "capacity", "local_only", "all_to_rank0"):
            layer_case(case, rank, world, ep_mesh)
            passed.append(f"layer/{case}")
    if "model" in cases:
        comm_s, step_s = model_case(rank, world, ep_mesh, os.path.join(checkpoint_dir, "model"))
        passed.append("model")
        report = f"all-to-all {comm_s * 1e3:.2f} ms of a {step_s * 1e3:.1f} ms fwd+bwd step"
    if "fsdp" in cases:
        fsdp_case(rank, world)
        passed.append("fsdp")
    # One writer: the ranks' prints would interleave in the launcher's pipe.
    results = [None] * world
    dist.all_gather_object(results, (passed, report))
    if rank == 0:
        for r, (rank_passed, rank_report) in enumerate(results):
            print(f"rank {r} passed: {' '.join(rank_passed)}", flush=True)
            if rank_report:
                print(f"rank {r} timing: {rank_report}", flush=True)
        print("EP CHECKS PASSED", flush=True)
    from harness import exit_rank  # here, not at the top: tests import this file as a module too

    exit_rank()


if __name__ == "__main__":
    main()
