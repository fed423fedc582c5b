"""Speculative decoding: cheap proposers guess k tokens, one target forward checks them all.

The acceptance rules are exact: greedy verification reproduces greedy decoding token for token, and
rejection sampling (Leviathan et al. 2023, Chen et al. 2023) leaves every output token distributed
exactly as the target's sampler would have drawn it. Accept draft token x with probability
min(1, p(x) / q(x)); on rejection draw from norm(max(0, p - q)); if all k are accepted draw a bonus
token from the target's distribution at position k+1. A proposer without probabilities (n-gram
lookup) is a point mass q = 1[x], so x is accepted with probability p(x).

`speculative_generate` is a reference loop with full-recompute target forwards, for tests and for
measuring acceptance; the engine wires the same rules into its batched runner.

Legend: T tokens, V vocabulary, K proposed tokens, Kp = K + 1 target positions checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moetron.infer.sampling import Sampler, SamplingState, make_generator
from moetron.infer.sampling_params import SamplingParams
from moetron.model.transformer import Transformer


class NgramProposer:
    """Prompt-lookup decoding: find the most recent earlier occurrence of the last n tokens
    (n from n_max down to n_min: the longest match wins) and propose the tokens that followed it."""

    def __init__(self, n_min: int = 1, n_max: int = 4, num_speculative_tokens: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes need 1 <= n_min={n_min} <= n_max={n_max}")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
        self.n_min, self.n_max, self.num_speculative_tokens = n_min, n_max, num_speculative_tokens

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Up to k tokens (fewer near the end of the match, none without a match)."""
        ids_T = np.asarray(token_ids, dtype=np.int64)
        num_tokens = len(ids_T)
        for n in range(min(self.n_max, num_tokens - 1), self.n_min - 1, -1):
            # windows start at 0..T-1-n, so a match is never the suffix itself and has a successor
            windows = np.lib.stride_tricks.sliding_window_view(ids_T[:-1], n)
            starts = np.flatnonzero((windows == ids_T[-n:]).all(axis=1))
            if starts.size:
                start = int(starts[-1]) + n
                return ids_T[start : start + self.num_speculative_tokens].tolist()
        return []


def _draft_params(params: SamplingParams) -> SamplingParams:
    # The draft only shapes q (any q keeps the output exact); history-dependent processors are the
    # target's business, so the draft keeps temperature and the filters only.
    return dataclasses.replace(
        params,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias={},
        min_tokens=0,
        logprobs=None,
    )


class DraftModelProposer:
    """A small `Transformer` with the target's vocabulary proposes k tokens, greedily (greedy
    params) or by sampling its own distribution q (temperature/top-k/top-p/min-p of the request),
    which it returns for the rejection rule. Full recompute over the context: simple, exact."""

    def __init__(self, draft: Transformer, num_speculative_tokens: int = 4) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
        self.draft = draft.eval()
        self.num_speculative_tokens = num_speculative_tokens
        self._sampler = Sampler()

    @torch.no_grad()
    def propose(
        self, token_ids: Sequence[int], params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        """Returns (k tokens, draft probs float32 [K, V], row j the q token j was drawn from)."""
        params = _draft_params(params)
        device = next(self.draft.parameters()).device
        limit = self.draft.cfg.max_seq_len
        ids = list(token_ids)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(self.num_speculative_tokens):
            logits_1V = self.draft(torch.tensor([ids[-limit:]], device=device))[:, -1].float().cpu()
            q_V = self._sampler.probs(logits_1V, [SamplingState(params, [], [], generator)])[0]
            token = (
                int(q_V.argmax()) if params.greedy else int(torch.multinomial(q_V, 1, generator=generator))
            )
            tokens.append(token)
            probs.append(q_V)
            ids.append(token)
        return tokens, torch.stack(probs)


def verify_greedy(target_logits_KpV: torch.Tensor, draft_tokens: Sequence[int]) -> list[int]:
    """Greedy check: keep draft tokens while they equal the target's argmax; the first mismatch is
    replaced by the target's token; if all match, the argmax at position k+1 is a bonus. Returns the
    accepted tokens plus that one token (1 to K+1 tokens). target_logits_KpV: [K+1, V] scores whose
    argmax is the target's choice (logits or probabilities)."""
    _check_shapes(target_logits_KpV, None, draft_tokens)
    best_Kp = target_logits_KpV.argmax(dim=-1).tolist()
    accepted: list[int] = []
    for j, token in enumerate(draft_tokens):
        if token != best_Kp[j]:
            return [*accepted, best_Kp[j]]
        accepted.append(token)
    return [*accepted, best_Kp[len(draft_tokens)]]


def rejection_sample(
    target_probs_KpV: torch.Tensor,
    draft_probs_KV: torch.Tensor | None,
    draft_tokens: Sequence[int],
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative sampling: accepted draft tokens plus one recovered (on rejection) or bonus token.

    target_probs_KpV: [K+1, V], row j the target's (processed, tempered, filtered) distribution for
    the token after draft token j-1. draft_probs_KV: [K, V], the q each draft token was drawn from,
    or None for a point mass (n-gram proposals)."""
    _check_shapes(target_probs_KpV, draft_probs_KV, draft_tokens)
    target_probs_KpV = target_probs_KpV.double().cpu()
    accepted: list[int] = []
    for j, token in enumerate(draft_tokens):
        p_V = target_probs_KpV[j]
        if draft_probs_KV is None:
            q_V = torch.zeros_like(p_V)
            q_V[token] = 1.0
        else:
            q_V = draft_probs_KV[j].double().cpu()
        u = float(torch.rand((), dtype=torch.float64, generator=generator))
        if u * q_V[token] < p_V[token]:  # u < p/q without dividing by a zero q
            accepted.append(token)
            continue
        residual_V = (p_V - q_V).clamp_(min=0.0)
        # rejection implies p(x) < q(x), so the residual has mass; rounding could leave ~0 though
        recovered_V = residual_V if residual_V.sum() > 1e-12 else p_V
        return [*accepted, _draw(recovered_V, generator)]
    return [*accepted, _draw(target_probs_KpV[len(draft_tokens)], generator)]


def _draw(probs_V: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs_V / probs_V.sum(), 1, generator=generator))


def _check_shapes(target_KpV: torch.Tensor, draft_KV: torch.Tensor | None, tokens: Sequence[int]) -> None:
    k = len(tokens)
    if target_KpV.dim() != 2 or target_KpV.shape[0] != k + 1:
        raise ValueError(
            f"target needs [k+1={k + 1}, vocab] rows for {k} draft tokens, got {tuple(target_KpV.shape)}"
        )
    if draft_KV is not None and tuple(draft_KV.shape) != (k, target_KpV.shape[1]):
        raise ValueError(
            f"draft probs must be [k={k}, vocab={target_KpV.shape[1]}], got {tuple(draft_KV.shape)}"
        )


@dataclass
class SpeculativeStats:
    num_steps: int = 0  # target forwards
    num_proposed: int = 0
    num_accepted: int = 0  # proposed tokens kept (bonus/recovered tokens not counted)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return (self.num_accepted + self.num_steps) / self.num_steps if self.num_steps else 0.0


@torch.no_grad()
def speculative_generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    proposer: NgramProposer | DraftModelProposer,
    max_tokens: int,
    generator: torch.Generator | None = None,
    stats: SpeculativeStats | None = None,
) -> list[int]:
    """Generate up to max_tokens with speculative decoding (reference loop: one full target forward
    per step over prompt + output + draft). The target's distribution at each checked position is
    the Sampler's, with the history up to that position, so penalties and min_tokens hold too.
    Stops after a stop token id (kept in the output). `generator` defaults to params.seed's."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if generator is None:
        generator = make_generator(params.seed, 0) or torch.Generator().manual_seed(
            int(torch.randint(2**62, ()))
        )
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    sampler = Sampler()
    prompt, output = list(prompt_ids), []
    while len(output) < max_tokens and len(prompt) + len(output) < limit:
        context = prompt + output
        if isinstance(proposer, NgramProposer):
            draft, draft_probs_KV = proposer.propose(context), None
        else:
            draft, draft_probs_KV = proposer.propose(context, params, generator)
        # never check past max_tokens or the context length (the extra token is the bonus)
        k = max(0, min(len(draft), max_tokens - len(output) - 1, limit - len(context) - 1))
        draft = draft[:k]
        if draft_probs_KV is not None:
            draft_probs_KV = draft_probs_KV[:k]
        logits_KpV = (
            model(torch.tensor([context + draft], device=device))[0, len(context) - 1 :].float().cpu()
        )
        states = [SamplingState(params, prompt, output + draft[:j], generator) for j in range(k + 1)]
        # one row per checked position, each with its own history (rows never affect each other)
        target_probs_KpV = sampler.probs(logits_KpV, states)
        if params.greedy:
            new = verify_greedy(target_probs_KpV, draft)
        else:
            new = rejection_sample(target_probs_KpV, draft_probs_KV, draft, generator)
        if stats is not None:
            stats.num_steps += 1
            stats.num_proposed += k
            stats.num_accepted += len(new) - 1
        for token in new:
            output.append(token)
            if token in params.stop_token_ids:
                return output
    return output[:max_tokens]
