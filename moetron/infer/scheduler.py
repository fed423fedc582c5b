"""Continuous batching: which sequences run this step, and how many of their tokens.

One token budget per step covers prefill chunks and decodes alike (vLLM V1's unified view: a
sequence simply has uncomputed tokens). Running sequences go first, in arrival order, each taking
all its uncomputed tokens or what is left of the budget (chunked prefill); then waiting sequences,
first come first served. When the KV pool runs dry, the newest running sequence is preempted by
recompute: its blocks are freed and it returns to the front of the waiting queue (its full blocks
stay in the prefix cache, so the recompute is often a cache hit).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from moetron.config import EngineConfig
from moetron.infer.block_manager import BlockManager
from moetron.infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: which of its tokens run, where they sit among the step's packed
    rows, and which rows' logits the step keeps for it."""

    seq: Sequence
    num_new_tokens: int  # tokens computed this step, draft tokens included
    first_position: int  # the position of its first new token (what the cache held before)
    first_row: int  # that token's row among the step's packed tokens
    logits_start: int  # its first row among the step's logits rows
    num_logits_rows: int  # 0 for a prefill chunk that neither samples nor scores the prompt
    samples: bool  # draws its next token from its last logits row (no draft tokens to verify)
    scores_prompt: bool  # its logits rows give prompt logprobs
    num_draft_tokens: int  # of num_new_tokens, the draft tokens its logits rows verify

    @property
    def logits_rows(self) -> slice:
        return slice(self.logits_start, self.logits_start + self.num_logits_rows)


@dataclass
class ScheduledBatch:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # packed rows whose logits the step needs
    num_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.scheduled)

    @property
    def seqs(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled]

    @property
    def num_new_tokens(self) -> list[int]:
        return [s.num_new_tokens for s in self.scheduled]

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append `seq`'s next `num_new_tokens` tokens and decide which of its rows need logits: all
        1 + k of a verification (draft tokens), all of a prompt chunk whose logprobs are wanted,
        else the last one when it ends the sequence (the next token is sampled from it)."""
        first_row, first_position = self.num_tokens, seq.num_computed_tokens
        reaches_end = first_position + num_new_tokens == seq.num_tokens
        num_draft_tokens = len(seq.spec_token_ids)
        verifies = num_draft_tokens > 0
        scores_prompt = (
            not verifies
            and seq.index == 0
            and seq.request.prompt_logprobs is not None
            and not seq.output_token_ids
        )
        if verifies or scores_prompt:
            rows = range(first_row, first_row + num_new_tokens)
        else:
            rows = (
                range(first_row + num_new_tokens - 1, first_row + num_new_tokens) if reaches_end else range(0)
            )
        self.scheduled.append(
            ScheduledSeq(
                seq, num_new_tokens, first_position, first_row, len(self.logits_rows), len(rows),
                samples=reaches_end and not verifies, scores_prompt=scores_prompt,
                num_draft_tokens=num_draft_tokens,
            )
        )  # fmt: skip
        self.logits_rows.extend(rows)
        self.num_tokens += num_new_tokens
        metrics = seq.request.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.monotonic()


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
            # A sequence without blocks (new, preempted or released) looks up the prefix cache. Siblings
            # of an n > 1 request always look: they exist to share sequence 0's prompt. (Prompt
            # logprobs need every prompt position computed, so those never look.)
            if not seq.block_table and (
                seq.index > 0
                or (self.cfg.enable_prefix_caching and seq.request.params.prompt_logprobs is None)
            ):
                seq.num_computed_tokens = seq.num_cached_tokens = self.block_manager.match_prefix(seq)
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
        Returns the sequences that sample a token now. (Draft tokens are not computed yet:
        `accept_drafts` moves past the accepted ones once they are verified.)"""
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens - item.num_draft_tokens
            self.block_manager.commit(item.seq)
        return [item.seq for item in batch.scheduled if item.samples]

    def accept_drafts(self, seq: Sequence) -> None:
        """After a verification appended its accepted tokens: the KV cache holds all but the newest
        token (the slots of accepted draft tokens held exactly those tokens); rejected slots are
        overwritten later. Only now are full blocks registered, so no rejected token ever enters
        the prefix cache."""
        seq.spec_token_ids, seq.spec_probs = [], None
        if seq.is_finished:  # its blocks are freed already
            return
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.commit(seq)
        self.block_manager.truncate(seq, seq.num_tokens)

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
