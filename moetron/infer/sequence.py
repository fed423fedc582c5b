"""Requests and their sequences: the engine's bookkeeping, free of any tensor.

A request with n > 1 holds n sequences over one prompt. Sequence 0 prefills the prompt; the others
join once it is done and find its full blocks in the prefix cache, so they share them (ref-counted)
and compute only the last partial block themselves.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moetron.infer.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from moetron.infer.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from moetron.infer.detokenizer import IncrementalDetokenizer, StopChecker
    from moetron.infer.sampling import SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the scheduler's waiting queue (new or preempted)
    RUNNING = "running"
    PENDING = "pending"  # a sibling waiting for sequence 0's prefill
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One stream of tokens: prompt + output, how much of it the KV cache holds, and its blocks.

    The KV cache holds tokens [0, num_computed_tokens); the newest sampled token is never in it yet,
    so a decoding sequence has exactly one uncomputed token. Only the scheduler moves
    num_computed_tokens (scheduler.py): after a step, on a prefix-cache hit, on preemption."""

    def __init__(
        self,
        request: Request,
        index: int,
        sampling_state: SamplingState,
        stop_checker: StopChecker,
        detokenizer: IncrementalDetokenizer | None = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # which of the request's n samples
        self.token_ids: list[int] = list(request.prompt_token_ids)
        # The sampling state's list, shared: the sampler reads the live history (penalties, min_tokens).
        self.output_token_ids: list[int] = sampling_state.output_token_ids
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.num_cached_tokens = 0  # prefix-cache hit of the first scheduling
        self.status = SequenceStatus.WAITING
        self.text = ""
        self.logprobs: list[PositionLogprobs] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sampling_state = sampling_state
        self.stop_checker = stop_checker
        self.detokenizer = detokenizer  # None: the model has no tokenizer (no text)
        # Speculative decoding: draft tokens to check this step (never part of token_ids) and the
        # draft's distributions they were drawn from (None: a point-mass proposer).
        self.spec_token_ids: list[int] = []
        self.spec_probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def scheduled_token_ids(self, first: int, num_new: int) -> list[int]:
        """Tokens [first, first + num_new) of token_ids followed by this step's draft tokens."""
        ids = self.token_ids[first : first + num_new]
        return ids + self.spec_token_ids[: num_new - len(ids)] if len(ids) < num_new else ids

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the KV cache (the caller frees the blocks)."""
        self.num_computed_tokens = 0
        self.spec_token_ids, self.spec_probs = [], None
        self.block_table = []
        self.block_hashes = []

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
            f"computed {self.num_computed_tokens}/{self.num_tokens})"
        )


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    adapter: int = 0  # the LoRA adapter its rows run (infer/adapters.py); 0: the base model

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
        )
