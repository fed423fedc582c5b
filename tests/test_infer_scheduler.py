"""Scheduler: token budget, max_num_seqs, chunked prefill mixed with decodes, FCFS, preemption by
recompute, and freeing on finish. No model: a step 'computes' by advancing the bookkeeping."""

from __future__ import annotations

from conftest import make_sequence

from moetron.config import EngineConfig
from moetron.infer.block_manager import BlockManager
from moetron.infer.scheduler import ScheduledBatch, Scheduler
from moetron.infer.sequence import Sequence, SequenceStatus


def make_seq(name: str, num_tokens: int) -> Sequence:
    return make_sequence([(hash(name) + i) % 1000 for i in range(num_tokens)], request_id=name)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **overrides) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **overrides)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def run_step(scheduler: Scheduler) -> ScheduledBatch:
    """Schedule, then what the engine does: update counts, sample one token for finished prefills."""
    batch = scheduler.schedule()
    for seq in scheduler.update(batch):
        seq.append_token(7)
    return batch


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(s.request.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]


def test_budget_chunked_prefill_and_decodes_in_one_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    for name in "abc":
        scheduler.add(make_seq(name, 10))
    assert plan(run_step(scheduler)) == [("a", 10), ("b", 6)]  # b chunked at the budget; c waits (FCFS)
    # a decodes 1 token, b finishes its prefill (4), c starts (10): 15 ≤ 16
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 4), ("c", 10)]
    batch = run_step(scheduler)
    assert plan(batch) == [("a", 1), ("b", 1), ("c", 1)]  # all decoding
    assert all(s.num_uncomputed_tokens == 1 for s in batch.seqs)


def test_long_prompt_prefilled_over_several_steps() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("long", 30)
    scheduler.add(seq)
    chunks = []
    while not seq.output_token_ids:
        chunks.append(plan(run_step(scheduler))[0][1])
    assert chunks == [8, 8, 8, 6]
    assert len(seq.block_table) == 8  # ceil(30 / 4), allocated as the chunks arrived


def test_without_chunked_prefill_a_prompt_waits_for_room() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    scheduler.add(make_seq("a", 10))
    scheduler.add(make_seq("b", 10))
    assert plan(run_step(scheduler)) == [("a", 10)]
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 10)]


def test_max_num_seqs_limits_running() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_seq(name, 3))
    assert [n for n, _ in plan(run_step(scheduler))] == ["a", "b"]
    assert [s.request.request_id for s in scheduler.waiting] == ["c"]


def test_preemption_frees_newest_and_requeues_it_first() -> None:
    # 6 blocks of 4: a and b take 2 blocks each at 8 tokens; decoding soon needs more than exist.
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    a, b = make_seq("a", 8), make_seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    waiting = make_seq("w", 3)
    run_step(scheduler)  # both prefill: 4 blocks used
    scheduler.add(waiting)
    preempted = []
    for _ in range(10):
        batch = run_step(scheduler)
        preempted += batch.preempted
        if preempted:
            break
    assert preempted == [b]  # the newest running sequence
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(scheduler.waiting)[:2] == [b, waiting]  # front of the queue, ahead of newer requests
    assert scheduler.num_preempted_total == 1
    assert plan(batch) == [("a", 1)]  # no new admissions in a step that had to preempt
    # b recomputes prompt + generated tokens once there is room again; its full blocks are still
    # in the prefix cache, so only the rest is computed
    scheduler.finish(a)
    num_tokens = b.num_tokens
    batch = run_step(scheduler)
    assert batch.seqs[0] is b and b.num_cached_tokens > 0 and b.num_cached_tokens % 4 == 0
    assert batch.num_new_tokens[0] == num_tokens - b.num_cached_tokens


def test_finish_frees_blocks_immediately() -> None:
    scheduler = make_scheduler(num_blocks=10, block_size=4)
    seq = make_seq("a", 9)
    scheduler.add(seq)
    run_step(scheduler)
    assert scheduler.block_manager.num_used_blocks == 3
    scheduler.finish(seq)
    assert scheduler.block_manager.num_used_blocks == 0
    assert not scheduler.has_unfinished() and seq.status is SequenceStatus.FINISHED


def test_prefix_cache_hit_skips_computed_tokens() -> None:
    scheduler = make_scheduler(block_size=4)
    first = make_seq("same", 10)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)
    again = make_seq("same", 10)
    scheduler.add(again)
    assert plan(run_step(scheduler)) == [("same", 2)]  # 8 tokens (2 full blocks) came from the cache
    assert again.num_cached_tokens == 8 and scheduler.prefix_hit_tokens_total == 8
