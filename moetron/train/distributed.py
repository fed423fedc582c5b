"""The trainer's view of a `torchrun` job: process group and mesh setup/teardown, which rank does
what, and the few reductions the training loop needs (losses, metrics, the global grad norm).

A plain `moetron train` (no WORLD_SIZE in the environment, or WORLD_SIZE=1) gets a context with
no process group and every degree 1, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moetron.config import ParallelConfig
from moetron.parallel.mesh import ParallelDims


@dataclass
class DistContext:
    dims: ParallelDims
    mesh: DeviceMesh | None  # None in a single process
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # torchrun's store without the attempt prefix: what one attempt sets there, later ones see
    job_store: dist.Store | None = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rank_on(self, axis: str) -> int:
        return self.mesh[axis].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.local_rank_on("dp")

    @property
    def reports_metrics(self) -> bool:
        """One rank per (data-parallel rank, pipeline stage): tp ranks hold copies of the same
        losses and statistics, so only tp rank 0 contributes them to a world-wide sum."""
        return self.local_rank_on("tp") == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_over_world(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (fp64), as one all-reduce."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max_over_world(self, value: float) -> float:
        """The largest `value` of any rank (fp64), the same on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def per_rank(self, value: float) -> list[float]:
        """`value` of every rank, in rank order."""
        if not self.distributed:
            return [value]
        slots = [0.0] * self.dims.world_size
        slots[self.rank] = value
        return self.sum_over_world(slots)

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def init_distributed(cfg: ParallelConfig) -> DistContext:
    """Join the torchrun job (if any): backend from the hardware (NCCL with CUDA, else gloo), one
    device per local rank, the named mesh from `cfg`. Degrees must multiply to the world size."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg, world_size)
    if world_size == 1:  # no process group; under torchrun, still the store (train/resume.py)
        in_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        job_store = next(dist.rendezvous("env://"))[0] if in_torchrun else None
        return DistContext(dims, None, device=device, job_store=job_store)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # After an elastic restart the agent's store still holds the previous attempt's keys (rank
    # addresses among them: gloo would connect to a dead peer), so each attempt gets a namespace.
    job_store, rank, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(
        f"moetron/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", job_store
    )
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    mesh = dims.build_mesh(device.type)
    return DistContext(dims, mesh, rank=dist.get_rank(), device=device, job_store=job_store)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


# Profiler events of communication: c10d collectives and point-to-point ops (explicit reductions,
# PP), functional collectives and their waits (DTensor/TP, the EP all-to-all), the backends' own
# spans; and FSDP2's all-gather / reduce-scatter regions, whose *self* time (their children, the
# c10d calls and copies, are counted apart) is where the training thread waits for the collective.
_COMM_MARKERS = ("c10d::", "_c10d_functional", "wait_tensor", "record_param_comms", "gloo:", "nccl")
_FSDP_WAIT_REGIONS = ("FSDP::all_gather", "FSDP::post_backward_reduce")


def _is_comm(event_name: str) -> bool:
    if any(marker in event_name for marker in _COMM_MARKERS):
        return True
    return event_name.startswith(_FSDP_WAIT_REGIONS) and "copy" not in event_name


@contextlib.contextmanager
def measure_comm_time(enabled: bool) -> Iterator[list[float]]:
    """Seconds this rank spends in communication ops inside the block, from a CPU (+CUDA) profile:
    the host time of collective calls and waits, plus NCCL kernel time on GPUs. An estimate: on
    gloo a collective's cost shows as the time the calling thread spends in it (including waiting
    for slower ranks); ops overlapped with compute on other streams count only their host part.
    Profiling slows the step, so the trainer samples one step per run."""
    result = [0.0]
    if not enabled:
        yield result
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield result
    total_us = 0.0
    for event in prof.key_averages():
        if _is_comm(event.key):
            total_us += event.self_cpu_time_total + getattr(event, "self_device_time_total", 0.0)
    result[0] = total_us / 1e6


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Global L2 gradient norm over every rank's parameters, then clip (max_norm=inf: only measure).

    Gradients may be DTensors on different meshes (FSDP's dp axes, TP's tp axis, EP's ep axis,
    combinations) or plain tensors (replicated on every rank that holds them). Each group sharing
    a mesh and placement gets its norm from DTensor (which reduces over its shards, counting
    replicas once); the squares are summed, and pipeline stages, which hold disjoint parameters,
    add theirs with an all-reduce over "pp"."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, DTensor) else "local"
        groups.setdefault(key, []).append(grad)
    total_sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0, foreach=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.double() ** 2
    if ctx.mesh is not None and ctx.dims.pp > 1:
        dist.all_reduce(total_sq, group=ctx.mesh["pp"].get_group())
    total = total_sq.sqrt().float()
    coef = float(max_norm / (total + 1e-6))
    if coef < 1.0:
        for group in groups.values():
            for grad in group:
                grad.mul_(coef)
    return total
