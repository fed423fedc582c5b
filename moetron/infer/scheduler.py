"""Continuous batching: which sequences run this step, and how many of their tokens.

One token budget per step covers prefill chunks and decodes alike (vLLM V1's unified view: a
sequence simply has uncomputed tokens). Running sequences go first, in arrival order, each taking
all its uncomputed tokens or what is left of the budget (chunked prefill); then waiting sequences,
first come first served. When the KV pool runs dry, the newest running sequence is preempted by
recompute: its blocks are freed and it returns to the front of the waiting queue (its full blocks
stay in the prefix cache, so the recompute is often a cache hit).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moetron.infer.block_manager import BlockManager
from moetron.infer.config import EngineConfig
from moetron.infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq, this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    def __init__(self, cfg: EngineConfig, block_manager: BlockManager) -> None:
        self.cfg = cfg
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted_total = 0
        self.prefix_hit_tokens_total = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.spec_token_ids:  # a decode with draft tokens: all 1 + k rows, or fall back to k = 0
                num_spec = 1 + len(seq.spec_token_ids)
                if num_spec <= budget and self.block_manager.allocate(seq, num_spec):
                    batch.add(seq, num_spec)
                    budget -= num_spec
                    i += 1
                    continue
                seq.spec_token_ids, seq.spec_probs = [], None
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
                continue
            break  # seq preempted itself: nothing after it is running
        if batch.preempted:  # the pool is full: admitting new work would only thrash
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                # Siblings of an n > 1 request always look: they exist to share sequence 0's prompt.
                # (Prompt logprobs need every prompt position computed, so those never look.)
                if seq.index > 0 or (
                    self.cfg.enable_prefix_caching and seq.request.params.prompt_logprobs is None
                ):
                    seq.num_cached_tokens = self.block_manager.match_prefix(seq)
                else:
                    seq.num_computed_tokens = 0
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                if not self.cfg.enable_chunked_prefill:
                    self._release(seq)
                    break
                num_new = budget
            if not self.block_manager.allocate(seq, num_new):
                self._release(seq)
                break
            self.waiting.popleft()
            self.prefix_hit_tokens_total += seq.num_computed_tokens  # waiting ⇒ all of it is a hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch

    def update(self, batch: ScheduledBatch) -> list[Sequence]:
        """After the forward: advance each sequence's computed count, register its new full blocks.
        Returns the sequences that reached their end (the ones with a token to sample)."""
        finished_prefill = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            # draft tokens are not computed yet: the engine advances past the accepted ones
            seq.num_computed_tokens += num_new - len(seq.spec_token_ids)
            self.block_manager.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                finished_prefill.append(seq)
        return finished_prefill

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.num_preempted_total += 1
        self.add(seq, front=True)

    def _release(self, seq: Sequence) -> None:
        """Undo a waiting sequence's prefix match (it could not be scheduled after all)."""
        self.block_manager.free(seq)
        seq.reset_for_recompute()
