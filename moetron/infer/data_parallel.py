"""Serving across processes: data-parallel attention (+ expert parallelism), rank 0 in front.

Every rank runs a whole LLMEngine (scheduler, prefix cache, chunked prefill, preemption, paged KV)
on its own requests; with expert parallelism it holds num_experts / ranks of every MoE layer's
experts, and its forwards exchange rows with the other ranks' (expert_parallel.py). Rank 0 is the
front: the HTTP server (or `LLM`) talks to a DataParallelEngine, which has LLMEngine's interface.

    rank 0: DataParallelEngine.step()             ranks 1..W-1: serve_rank()
      broadcast StepPlan (new requests, aborts) ──→ apply them to the local engine
      local engine.step()  ←─── expert exchange ───→ local engine.step()   (lockstep: a rank with
      gather RankReport (outputs)               ←── nothing to run still serves its experts)

`get_stats()` is a round of its own (a StepPlan asking for stats, no step): /metrics reads every
rank's counters fresh, and steps carry only outputs.

The control plane is nano-vllm's (rank 0 schedules, workers execute) at the level of requests:
each step's plan is a pickled object broadcast on torch.distributed (gloo), between our own
processes. Requests go to the rank with the fewest outstanding tokens (prompt + max_tokens not yet
produced, times n). Bits: a rank runs its requests exactly as one process would (batch-invariant
kernels; expert_parallel.py for the exchange), so outputs are those of the one-process engine.

Processes: on one node `launch` starts ranks 1..W-1 itself (spawned, `torch.set_num_threads` =
cores / W each); on several nodes each node runs the same command with its --node-rank and starts
its own ranks; under torchrun every process is a rank already (RANK / WORLD_SIZE in the environment).
Only global rank 0 returns an engine; the others serve until rank 0 stops them, then exit.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetron.config import EngineConfig, ModelConfig
from moetron.infer.expert_parallel import ExpertExchange, ExpertShard
from moetron.infer.head_parallel import HeadParallel
from moetron.infer.outputs import EngineStats, RequestOutput
from moetron.infer.sampling_params import SamplingParams

log = logging.getLogger("moetron.infer")

# Idle workers wait in a broadcast for the next step as long as the server is up: a dead peer
# breaks the wait at once (gloo sees the socket close), so the timeout only bounds a hung one.
_COLLECTIVE_TIMEOUT = timedelta(days=365)


class WorkerDiedError(RuntimeError):
    """A serving rank died or disconnected: the distributed engine cannot step any more."""


@dataclass
class StepPlan:
    """What rank 0 sends every rank before a step."""

    adds: list[list[tuple[str, list[int], SamplingParams, str | None]]]  # per rank
    aborts: list[list[str]]  # per rank
    stop: bool = False
    stats: bool = False  # no step: every rank reports its EngineStats


@dataclass
class RankReport:
    """What each rank sends rank 0: once loaded (or its load error), then after each step its
    outputs, or its stats when asked."""

    rank: int
    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats | None = None
    error: str | None = None


def check_layout(cfg: EngineConfig, model_cfg: ModelConfig) -> None:
    """Refuse a layout the model cannot take, naming the flags."""
    ranks, tp = cfg.data_parallel_size, cfg.tensor_parallel_size
    if cfg.lora_modules:
        raise ValueError(
            "--lora-modules with --data-parallel-size / --tensor-parallel-size > 1 is not supported yet"
        )
    if tp > 1:
        if model_cfg.num_kv_heads == 1:
            raise ValueError(
                f"--tensor-parallel-size={tp}: the model has one KV head (multi-query attention), which "
                "tensor parallelism cannot split; serve it with --data-parallel-size N "
                "--enable-expert-parallel (attention data-parallel, experts sharded)"
            )
        if model_cfg.num_kv_heads % tp or model_cfg.num_heads % tp:
            raise ValueError(
                f"--tensor-parallel-size={tp} must divide the model's {model_cfg.num_kv_heads} KV heads and "
                f"{model_cfg.num_heads} query heads"
            )
    if tp > 1 or cfg.enable_expert_parallel:  # both run the fused decoder layers, all-MoE models only
        moe = model_cfg.moe
        if model_cfg.num_moe_layers == 0 or moe.num_dense_layers or moe.num_shared_experts:
            flag = f"--tensor-parallel-size={tp}" if tp > 1 else "--enable-expert-parallel"
            raise ValueError(
                f"{flag} serves models whose every layer is routed-expert MoE without shared experts (this "
                f"one has {moe.num_dense_layers} dense layers, {moe.num_shared_experts} shared experts)"
            )
    if not cfg.enable_expert_parallel:
        return
    moe = model_cfg.moe
    if ranks > moe.num_experts:
        raise ValueError(
            f"--data-parallel-size={ranks} with --enable-expert-parallel: more ranks than the model's "
            f"{moe.num_experts} experts"
        )
    if moe.num_experts % ranks:
        raise ValueError(
            f"--data-parallel-size={ranks} with --enable-expert-parallel must divide the model's "
            f"{moe.num_experts} experts"
        )


# --- processes ---------------------------------------------------------------------------------


# A rank's engine from (model_dir, cfg, experts=, exchange=, heads=): LLMEngine.load, passed in by
# the caller (engine.py imports this module; this one does not import it back).
RankLoader = Callable[..., Any]


def launch(model_dir: str | Path, cfg: EngineConfig, load: RankLoader) -> DataParallelEngine:
    """Start (or join) the serving ranks of `cfg`'s layout, each rank's engine built by `load`;
    global rank 0 gets the front engine, every other rank serves until stopped and then exits the
    process (status 0)."""
    from moetron.convert.hf import load_config

    if Path(model_dir).suffix == ".gguf":
        raise ValueError(
            f"{model_dir}: serving a GGUF file across processes is not supported; use the model directory"
        )
    check_layout(cfg, load_config(model_dir))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: this process is one rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != cfg.data_parallel_size * cfg.tensor_parallel_size:
            raise ValueError(
                f"--data-parallel-size={cfg.data_parallel_size} × --tensor-parallel-size="
                f"{cfg.tensor_parallel_size} ranks, but torchrun started {world}"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        init_method, workers = "env://", []
    else:
        world = cfg.data_parallel_size * cfg.tensor_parallel_size
        local = world // cfg.nnodes
        rank = cfg.node_rank * local
        port = cfg.master_port or _free_port(cfg.master_addr)
        init_method = f"tcp://{cfg.master_addr}:{port}"
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(
                target=_worker_main,
                args=(
                    r,
                    world,
                    init_method,
                    str(model_dir),
                    load,
                    _threads(local),
                    logging.getLogger().level,
                ),
                name=f"moetron-rank{r}",
                daemon=True,
            )
            for r in range(rank + 1, rank + local)
        ]
        for process in workers:
            process.start()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_threads(local))
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=_COLLECTIVE_TIMEOUT
    )
    if rank != 0:
        _serve_forever(rank, world, str(model_dir), load)
        sys.exit(0)
    cfg = _resolve_kv_blocks(model_dir, cfg, local)
    dist.broadcast_object_list([cfg], src=0)
    try:
        engine = _load_rank(load, model_dir, cfg, 0, world)
        reports = _gather(RankReport(0))  # every rank loaded, or why not
    except BaseException:
        _abandon(workers, threads_before)
        raise
    if failed := [r for r in reports if r.error]:
        _abandon(workers, threads_before)
        raise RuntimeError("; ".join(f"rank {r.rank} failed to load: {r.error}" for r in failed))
    front = DataParallelEngine(engine, world, workers, threads_before)
    atexit.register(front.shutdown)  # `LLM` users never call it; a server's engine thread does
    return front


def _abandon(workers: list[multiprocessing.Process], threads_before: int) -> None:
    """A launch that failed: end this node's ranks and leave the process as it was."""
    for process in workers:
        process.kill()
        process.join()
    dist.destroy_process_group()
    torch.set_num_threads(threads_before)


def _threads(local_ranks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_ranks)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve_kv_blocks(model_dir: str | Path, cfg: EngineConfig, local_ranks: int) -> EngineConfig:
    """One KV pool size for every rank (rank 0 checks prompts against it), from this node's memory
    shared by its ranks."""
    from moetron.convert.hf import load_config
    from moetron.infer.runner import num_kv_blocks

    if cfg.num_kv_blocks is not None:
        return cfg
    model_cfg = load_config(model_dir)
    # Under tensor parallelism a rank's cache holds its share of the KV heads.
    model_cfg = dataclasses.replace(
        model_cfg, num_kv_heads=model_cfg.num_kv_heads // cfg.tensor_parallel_size
    )
    dtype = cfg.torch_kv_dtype(cfg.torch_dtype or torch.float32)
    # A fraction of free memory is this node's, shared by its ranks; an explicit byte budget is per rank.
    shared = (
        cfg
        if cfg.kv_cache_memory_bytes is not None
        else cfg.replace(kv_cache_memory_fraction=cfg.kv_cache_memory_fraction / local_ranks)
    )
    return cfg.replace(
        num_kv_blocks=num_kv_blocks(model_cfg, shared, dtype, cfg.resolve_max_model_len(model_cfg))
    )


def _load_rank(load: RankLoader, model_dir: str | Path, cfg: EngineConfig, rank: int, world: int) -> Any:
    """This rank's engine. Ranks form a grid of data_parallel_size groups of tensor_parallel_size
    (rank = dp_rank · tp + tp_rank): a group shares its requests and splits their attention heads;
    with expert parallelism the ranks of equal tp_rank (one per group) split the experts."""
    from moetron.convert.hf import load_config

    tp = cfg.tensor_parallel_size
    dp_rank, tp_rank = divmod(rank, tp)
    heads = expert_group = None
    if tp > 1:  # every rank creates every group, in the same order (torch.distributed's rule)
        for first in range(0, world, tp):
            group = dist.new_group(list(range(first, first + tp)))
            if first == dp_rank * tp:
                heads = HeadParallel(tp_rank, tp, group)
        if cfg.enable_expert_parallel:
            for index in range(tp):
                group = dist.new_group(list(range(index, world, tp)))
                if index == tp_rank:
                    expert_group = group
    if not cfg.enable_expert_parallel or cfg.data_parallel_size == 1:
        return load(model_dir, cfg, heads=heads)
    shard = ExpertShard(dp_rank, cfg.data_parallel_size, load_config(model_dir).moe.num_experts)
    return load(
        model_dir, cfg, experts=shard.experts, exchange=ExpertExchange(shard, expert_group), heads=heads
    )


def _worker_main(
    rank: int, world: int, init_method: str, model_dir: str, load: RankLoader, threads: int, log_level: int
) -> None:
    """A spawned rank's process: join the group, take rank 0's engine config, serve."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=_COLLECTIVE_TIMEOUT
    )
    _serve_forever(rank, world, model_dir, load)


def _serve_forever(rank: int, world: int, model_dir: str, load: RankLoader) -> None:
    """Ranks 1..W-1: load this rank's engine, then run rank 0's steps until it says stop."""
    # Rank 0 drains on SIGTERM and then stops every rank; a signal to the whole process group (or
    # torchrun forwarding it) must not kill the ranks under the requests rank 0 is draining.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    received: list[Any] = [None]
    dist.broadcast_object_list(received, src=0)
    cfg = received[0]
    try:
        engine = _load_rank(load, model_dir, cfg, rank, world)
    except Exception as e:  # tell rank 0 why, then leave
        log.exception("rank %d failed to load %s", rank, model_dir)
        _gather(RankReport(rank, error=f"{type(e).__name__}: {e}"))
        dist.destroy_process_group()
        sys.exit(1)
    _gather(RankReport(rank))  # loaded
    try:
        while True:
            plan_box: list[Any] = [None]
            dist.broadcast_object_list(plan_box, src=0)
            plan: StepPlan = plan_box[0]
            if plan.stop:
                break
            if plan.stats:
                _gather(RankReport(rank, stats=engine.get_stats()))
                continue
            _apply(engine, plan, rank)
            outputs = engine.step()
            # A tensor-parallel group's ranks all compute the same outputs: its first sends them.
            _gather(RankReport(rank, outputs if rank % cfg.tensor_parallel_size == 0 else []))
    except RuntimeError:
        log.exception("rank %d lost the other ranks; exiting", rank)
        sys.exit(1)
    log.info("rank %d stopped", rank)
    dist.destroy_process_group()


def _apply(engine: Any, plan: StepPlan, rank: int) -> None:
    for request_id in plan.aborts[rank]:
        engine.abort(request_id)
    for request_id, token_ids, params, prompt in plan.adds[rank]:
        engine.add_request(token_ids, params, request_id=request_id, prompt=prompt)


def _gather(report: RankReport) -> list[RankReport]:
    """Every rank's report at rank 0 (an empty list elsewhere)."""
    reports: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(report, reports, dst=0)
    return reports or []


# --- the front ---------------------------------------------------------------------------------


class DataParallelEngine:
    """LLMEngine's interface over W serving ranks; rank 0's own engine is one of them."""

    def __init__(
        self,
        local: Any,
        world_size: int,
        workers: list[multiprocessing.Process],
        threads_before: int | None = None,
    ) -> None:
        self.local = local
        self._threads_before = threads_before  # this process's torch threads before launch
        self.world_size = world_size
        self.workers = workers  # the processes this node started (none under torchrun)
        self.config: EngineConfig = local.config
        self.tokenizer, self.model_name = local.tokenizer, local.model_name
        self.max_model_len, self.vocab_size = local.max_model_len, local.vocab_size
        # Ranks g·tp … g·tp + tp - 1 are data-parallel group g (its tensor-parallel ranks).
        self.tp = self.config.tensor_parallel_size
        self.num_groups = world_size // self.tp
        self._owner: dict[str, int] = {}  # request id -> its group
        self._cost: dict[str, int] = {}  # request id -> its prompt + max_tokens, times n
        self._remaining: dict[str, int] = {}  # ... less the tokens generated so far
        self._outstanding = [0] * self.num_groups  # per group: sum of its requests' _remaining
        self._adds: list[list[tuple]] = [[] for _ in range(world_size)]
        self._aborts: list[list[str]] = [[] for _ in range(world_size)]
        self._ids = 0
        self._stopped = False
        self._final_stats: EngineStats | None = None

    def _group_ranks(self, group: int) -> range:
        return range(group * self.tp, (group + 1) * self.tp)

    # --- requests ---

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        ids = list(prompt_token_ids)
        self.local._check_prompt(ids, params)  # every rank has the same limits and pool size
        if request_id is None:
            request_id, self._ids = f"dp-{self._ids}", self._ids + 1
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already running")
        if self.tp > 1 and params.seed is None:  # a group's ranks must draw the same samples
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        group = min(range(self.num_groups), key=lambda g: (self._outstanding[g], g))
        for rank in self._group_ranks(group):
            if rank == 0:
                self.local.add_request(ids, params, request_id=request_id, prompt=prompt)
            else:
                self._adds[rank].append((request_id, ids, params, prompt))
        cost = params.n * (len(ids) + (params.max_tokens or self.max_model_len - len(ids)))
        self._owner[request_id], self._cost[request_id], self._remaining[request_id] = group, cost, cost
        self._outstanding[group] += cost
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its final output only when rank 0 holds it (None otherwise)."""
        group = self._owner.get(request_id)
        if group is None:
            return None
        self._forget(request_id)
        final = None
        for rank in self._group_ranks(group):
            if rank == 0:
                final = self.local.abort(request_id)
                continue
            pending = [a for a in self._adds[rank] if a[0] != request_id]
            if len(pending) == len(self._adds[rank]):
                self._aborts[rank].append(request_id)
            self._adds[rank] = pending
        return final

    def _forget(self, request_id: str) -> None:
        group = self._owner.pop(request_id)
        self._outstanding[group] -= self._remaining.pop(request_id)
        del self._cost[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    # --- the step ---

    def step(self) -> list[RequestOutput]:
        """One step on every rank; the outputs of all their requests that moved."""
        plan = StepPlan(self._adds, self._aborts)
        self._adds = [[] for _ in range(self.world_size)]
        self._aborts = [[] for _ in range(self.world_size)]
        try:
            dist.broadcast_object_list([plan], src=0)
            outputs = list(self.local.step())
            reports = _gather(RankReport(0))
        except RuntimeError as e:  # gloo: a peer closed its connection
            raise WorkerDiedError(self._who_died(e)) from e
        for report in reports:
            outputs.extend(report.outputs)
        for out in outputs:
            group = self._owner.get(out.request_id)
            if group is None:
                continue  # aborted meanwhile
            if out.finished:
                self._forget(out.request_id)
                continue
            produced = sum(len(o.token_ids) for o in out.outputs)
            remaining = max(0, self._cost[out.request_id] - produced)
            self._outstanding[group] += remaining - self._remaining[out.request_id]
            self._remaining[out.request_id] = remaining
        return outputs

    def _dead_workers(self) -> str | None:
        """The workers this node started that have exited, described; None while all run."""
        dead = [p for p in self.workers if p.exitcode is not None]
        return "; ".join(f"{p.name} (pid {p.pid}) died with exit code {p.exitcode}" for p in dead) or None

    def _who_died(self, error: BaseException) -> str:
        time.sleep(0.2)  # let a dying process's exit code settle
        return self._dead_workers() or f"a serving rank disconnected: {error}"

    def failure(self) -> str | None:
        """Which worker this node started has died, if any (the server polls this)."""
        return None if self._stopped else self._dead_workers()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every rank (after the requests in flight: the caller drains first)."""
        if self._stopped:
            return
        with contextlib.suppress(RuntimeError):  # WorkerDiedError: no last counters to keep
            self._final_stats = self.get_stats()
        self._stopped = True
        try:
            dist.broadcast_object_list([StepPlan([], [], stop=True)], src=0)
        except RuntimeError:  # a rank is gone: the others cannot be told, so end them
            log.warning("some ranks were already gone at shutdown")
            timeout = 0.0
        for process in self.workers:
            process.join(timeout)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

    # --- introspection ---

    def get_stats(self) -> EngineStats:
        """The sum over ranks (expert counts included), with each rank's own in `ranks`."""
        if self._stopped:  # the ranks' last counters, taken at shutdown
            if self._final_stats is None:
                raise WorkerDiedError("the serving ranks are gone")
            return self._final_stats
        try:
            dist.broadcast_object_list([StepPlan([], [], stats=True)], src=0)
            reports = _gather(RankReport(0, stats=self.local.get_stats()))
        except RuntimeError as e:
            raise WorkerDiedError(self._who_died(e)) from e
        ranks = [r.stats for r in sorted(reports, key=lambda r: r.rank)]
        # A group's tensor-parallel ranks hold the same requests: count them once (the first's).
        leaders = ranks[:: self.tp]
        total = dataclasses.replace(ranks[0], ranks=ranks)
        for name in (
            "num_waiting", "num_running", "num_preempted_total", "kv_blocks_total", "kv_blocks_used",
            "kv_blocks_cached_free", "prefix_cache_hit_tokens_total", "prompt_tokens_total",
            "generation_tokens_total", "spec_proposed_tokens_total", "spec_accepted_tokens_total",
        ):  # fmt: skip
            setattr(total, name, sum(getattr(s, name) for s in leaders))
        total.weight_bytes = sum(s.weight_bytes for s in ranks)
        total.exchange_seconds_total = sum(s.exchange_seconds_total for s in ranks)
        total.num_waiting += sum(len(a) for a in self._adds[:: self.tp])
        total.tokens_per_expert = [
            [sum(counts) for counts in zip(*layer, strict=True)]
            for layer in zip(*(s.tokens_per_expert for s in leaders), strict=True)
        ]
        total.num_forward_steps_total = max(s.num_forward_steps_total for s in ranks)
        return total

    def kv_cache_bytes(self) -> int:
        return self.local.kv_cache_bytes() * self.world_size
