"""Speculative decoding inside the engine step: propose, verify, roll back.

    propose(running)     # decode sequences get up to k draft tokens (seq.spec_token_ids)
    schedule()           # such a sequence runs 1 + k rows, or k = 0 when budget or blocks are short
    forward              # logits for all 1 + k rows, in the same packed forward as everyone else
    verify(seq, logits)  # verify_greedy / rejection_sample (speculative.py): 1 to k + 1 new tokens
    accept_drafts(seq)   # the scheduler: KV valid up to the accepted tokens, blocks past the end freed

Rows are bit-invariant to what shares the batch (batch_invariant.py), so the target's logits for a
position are exactly those plain decoding would see: greedy output is bit-identical, and sampled
output follows the target's distribution exactly (the rejection rule, with every processor applied
per position with that position's output history).

Legend: V vocabulary, K draft tokens, Kp = K + 1 checked positions.
"""

from __future__ import annotations

import torch

from moetron.config import EngineConfig
from moetron.infer.outputs import PositionLogprobs
from moetron.infer.sampling import Sampler, SamplingState, position_logprobs
from moetron.infer.sequence import Sequence
from moetron.infer.speculative import DraftModelProposer, NgramProposer, rejection_sample, verify_greedy
from moetron.model.transformer import Transformer


class SpecDecoder:
    def __init__(
        self, cfg: EngineConfig, target: Transformer, sampler: Sampler, draft: Transformer | None = None
    ) -> None:
        k = cfg.num_speculative_tokens
        self.sampler = sampler
        self.proposer: NgramProposer | DraftModelProposer
        if cfg.speculative_method == "ngram":
            self.proposer = NgramProposer(cfg.ngram_min, cfg.ngram_max, k)
        elif cfg.speculative_method == "draft":
            if draft is None:
                raise ValueError("speculative_method='draft' needs draft_model_dir (or a draft model)")
            if draft.cfg.vocab_size != target.cfg.vocab_size:
                raise ValueError(
                    f"the draft model's vocab_size={draft.cfg.vocab_size} must equal the target's "
                    f"{target.cfg.vocab_size} (its tokens are checked as the target's)"
                )
            self.proposer = DraftModelProposer(draft, k)
        else:
            raise ValueError(f"speculative_method={cfg.speculative_method!r} needs no SpecDecoder")
        self.num_proposed_total = 0
        self.num_accepted_total = 0

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Draft tokens for each decoding sequence (one uncomputed token and some output)."""
        for seq in running:
            seq.spec_token_ids, seq.spec_probs = [], None
            if seq.num_uncomputed_tokens != 1 or not seq.output_token_ids:
                continue  # prefill (or recompute after preemption): nothing to speculate on
            if seq.sampling_state.grammar is not None:
                continue  # draft tokens would need the grammar's verdict on each: constrained rows decode one by one
            params = seq.request.params
            left = max_model_len - seq.num_tokens
            if params.max_tokens is not None:
                left = min(left, params.max_tokens - len(seq.output_token_ids))
            k = left - 1  # the last checked row yields one token of its own
            if k < 1:
                continue
            if isinstance(self.proposer, NgramProposer):
                tokens, probs_KV = self.proposer.propose(seq.token_ids), None
            else:
                tokens, probs_KV = self.proposer.propose(seq.token_ids, params, seq.sampling_state.generator)
            seq.spec_token_ids = tokens[:k]
            seq.spec_probs = None if probs_KV is None else probs_KV[: len(seq.spec_token_ids)]

    def verify(
        self, seq: Sequence, logits_KpV: torch.Tensor
    ) -> tuple[list[int], list[PositionLogprobs | None]]:
        """The tokens to append (accepted drafts + one target token) and their logprobs (from the
        target's raw logits at their positions, as the Sampler reports them)."""
        draft = seq.spec_token_ids
        state = seq.sampling_state
        output = list(seq.output_token_ids)
        # one state per checked position, each with its own output history (penalties, min_tokens)
        states = [
            SamplingState(state.params, state.prompt_token_ids, output + draft[:j], state.generator,
                          state.eos_token_id)
            for j in range(len(draft) + 1)
        ]  # fmt: skip
        probs_KpV = self.sampler.probs(logits_KpV, states)
        if state.params.greedy:
            tokens = verify_greedy(probs_KpV, draft)
        else:
            tokens = rejection_sample(probs_KpV, seq.spec_probs, draft, state.generator)
        self.num_proposed_total += len(draft)
        self.num_accepted_total += len(tokens) - 1
        logprobs: list[PositionLogprobs | None] = [None] * len(tokens)
        if state.params.logprobs is not None:
            for j, token in enumerate(tokens):
                logprobs_V = torch.log_softmax(logits_KpV[j : j + 1].float(), dim=-1)[0]
                logprobs[j] = position_logprobs(logprobs_V, token, state.params.logprobs)
        return tokens, logprobs
