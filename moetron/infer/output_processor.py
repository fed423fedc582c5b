"""What a step's logits become: prompt logprobs, sampled tokens, verified draft tokens, text, stops.

The engine hands each step's ScheduledBatch and logits here after the scheduler has advanced the
computed counts; the batch says which logits rows belong to which sequence and what they are for
(scheduler.ScheduledSeq). Every sequence that samples is drawn in one batch-invariant Sampler call;
sequences with draft tokens are verified one by one (spec_decode.py). Each new token is appended,
detokenized and checked against the stop conditions; finished sequences are freed at once.
"""

from __future__ import annotations

import logging
import time

import torch

from moetron.infer.outputs import PositionLogprobs, RequestOutput
from moetron.infer.sampling import Sampler, prompt_logprobs
from moetron.infer.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from moetron.infer.sequence import Request, Sequence
from moetron.infer.spec_decode import SpecDecoder

log = logging.getLogger("moetron.infer")


class OutputProcessor:
    def __init__(
        self,
        scheduler: Scheduler,
        sampler: Sampler,
        requests: dict[str, Request],
        max_model_len: int,
        spec: SpecDecoder | None = None,
    ) -> None:
        self.scheduler, self.sampler, self.spec = scheduler, sampler, spec
        self.requests = requests  # the engine's live requests: finished ones are removed here
        self.max_model_len = max_model_len
        self.generation_tokens_total = 0

    def process(self, batch: ScheduledBatch, logits_RV: torch.Tensor) -> list[RequestOutput]:
        """The outputs of the requests that got new tokens or finished (cumulative text and ids)."""
        for item in batch.scheduled:
            if item.scores_prompt:
                self._add_prompt_logprobs(item, logits_RV[item.logits_rows])
        progressed: dict[str, Request] = {}
        sampling = [item for item in batch.scheduled if item.samples]
        if sampling:
            self._sample(sampling, logits_RV)
            progressed.update((item.seq.request.request_id, item.seq.request) for item in sampling)
        for item in batch.scheduled:
            if item.num_draft_tokens:
                self._verify(item, logits_RV[item.logits_rows])
                progressed[item.seq.request.request_id] = item.seq.request
        outputs = []
        for request in progressed.values():
            outputs.append(request.output())
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self.requests.pop(request.request_id, None)
        return outputs

    def _sample(self, sampling: list[ScheduledSeq], logits_RV: torch.Tensor) -> None:
        rows = [item.logits_rows.stop - 1 for item in sampling]  # each one's last row
        every_row = rows == list(range(logits_RV.shape[0]))  # decodes only: no gather copy
        sampled = self.sampler(
            logits_RV if every_row else logits_RV[rows], [item.seq.sampling_state for item in sampling]
        )
        for item, token_id, logprobs in zip(sampling, sampled.token_ids, sampled.logprobs, strict=True):
            self._append_token(item.seq, token_id, logprobs)

    def _verify(self, item: ScheduledSeq, logits_KpV: torch.Tensor) -> None:
        """Draft tokens checked against the target's rows: append the accepted ones and one of the
        target's (a stop mid-run drops the rest), then let the scheduler move past them."""
        assert self.spec is not None
        seq = item.seq
        tokens, logprobs = self.spec.verify(seq, logits_KpV)
        for token_id, token_logprobs in zip(tokens, logprobs, strict=True):
            self._append_token(seq, token_id, token_logprobs)
            if seq.is_finished:
                break
        self.scheduler.accept_drafts(seq)

    @staticmethod
    def _add_prompt_logprobs(item: ScheduledSeq, logits_nV: torch.Tensor) -> None:
        """Row i of this chunk (position p) scores prompt token p + 1."""
        seq, request = item.seq, item.seq.request
        if item.first_position == 0:  # a recompute after preemption starts the list over
            request.prompt_logprobs = [None]
        num_scored = min(logits_nV.shape[0], seq.num_prompt_tokens - 1 - item.first_position)
        request.prompt_logprobs.extend(
            prompt_logprobs(
                logits_nV[:num_scored], seq.token_ids, item.first_position, request.params.prompt_logprobs
            )
        )

    def _append_token(self, seq: Sequence, token_id: int, logprobs: PositionLogprobs | None) -> None:
        request, now = seq.request, time.monotonic()
        first = not seq.output_token_ids
        seq.append_token(token_id)
        self.generation_tokens_total += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            request.metrics.num_cached_prompt_tokens = seq.num_cached_tokens
        request.metrics.last_token_time = now
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        if seq.detokenizer is not None:
            seq.detokenizer.add(token_id)
            seq.text = seq.detokenizer.text
        finish_reason, stop_reason, text = seq.stop_checker.check(seq.output_token_ids, seq.text)
        grammar = seq.sampling_state.grammar
        if grammar is not None and finish_reason is None:
            if not grammar.accept(token_id):  # drawn under its mask: a bug, not the client's fault
                log.error(
                    "request %s: the grammar refused token %d: %s",
                    request.request_id,
                    token_id,
                    grammar.error,
                )
                finish_reason = "abort"
            elif grammar.is_finished:  # nothing but EOS can follow: the structured output is complete
                finish_reason = "stop"
        if finish_reason is None and seq.num_tokens >= self.max_model_len:
            finish_reason = "length"
        if finish_reason is not None:
            if seq.detokenizer is not None and not isinstance(stop_reason, str):
                seq.detokenizer.flush()  # bytes held back for a character that will never complete
                text = seq.detokenizer.text
            seq.text, seq.finish_reason, seq.stop_reason = text, finish_reason, stop_reason
            self.scheduler.finish(seq)
        if first and seq.index == 0:  # the prompt is in the cache: siblings can share its blocks
            for sibling in reversed(request.seqs[1:]):
                self.scheduler.add(sibling, front=True)
