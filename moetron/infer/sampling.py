"""Batch-invariant sampling: logits of a batch of sequences → one token (and its logprobs) per row.

A row's result depends only on its own logits, parameters, token history and generator, never on
which other rows share the batch or their order. Work that is elementwise or reduces along the
vocabulary of one row is vectorised over rows (CPU kernels reduce each row the same way whatever
the row count); randomness is drawn per row from that row's own generator (the exponential race
`argmax(probs / Exponential(1))`, as vLLM does), so a batched `torch.multinomial` never couples rows.

Processing order (vLLM's): grammar mask (structured outputs) → logit_bias → min_tokens (mask EOS
and stop ids) → repetition penalty (CTRL, over prompt + output) → presence/frequency penalties
(OpenAI, over output) → [logprobs] → temperature → top-k → top-p → min-p → greedy argmax or sample.

Legend: S sequences (rows), R rows needing some step, V vocabulary, K top-k values, C top-p candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moetron.infer.outputs import Logprob, PositionLogprobs
from moetron.infer.sampling_params import SamplingParams, SamplingParamsError
from moetron.infer.structured_output import GrammarState, mask_bias

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int | None, sample_index: int) -> torch.Generator | None:
    """A CPU generator for sample `sample_index` of a request with `seed`: reproducible, and the n
    samples of one request draw different streams (seed and index are mixed by splitmix64, so
    neighbouring seeds or indices give unrelated streams). None when seed is None: `SamplingState`
    then seeds a fresh generator from the global torch RNG. Create it once per sequence and keep it:
    its state advances with every sampled token."""
    if seed is None:
        return None
    if sample_index < 0:
        raise ValueError(f"sample_index={sample_index} must be >= 0")
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ sample_index)
    return torch.Generator(device="cpu").manual_seed(mixed)


def _fresh_generator() -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,)))  # from the global RNG: torch.manual_seed reproduces it
    return torch.Generator(device="cpu").manual_seed(seed)


@dataclass
class SamplingState:
    """One sequence as the sampler sees it. `output_token_ids` is the engine's live list (it appends
    each sampled token); `generator` must persist across steps. `eos_token_id` overrides the
    Sampler's for this sequence (None: use the Sampler's)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_id: int | None = None
    grammar: GrammarState | None = None  # structured outputs: the tokens allowed next
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.generator is None and not self.params.greedy:
            self.generator = _fresh_generator()

    def prompt_ids(self) -> torch.Tensor:
        """The prompt as an int64 tensor, built once (it can be long; penalties need it every step)."""
        if self._prompt_ids is None:
            self._prompt_ids = torch.tensor(list(self.prompt_token_ids), dtype=torch.long)
        return self._prompt_ids


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None where params.logprobs is None


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Reject ids the model cannot produce (the engine calls this when a request arrives)."""
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(name, f"{name} has token ids {bad[:5]} >= vocab_size={vocab_size}")


def position_logprobs(logprobs_V: torch.Tensor, token_id: int, num_top: int) -> PositionLogprobs:
    """The chosen token's logprob and rank (1 = most likely) plus the `num_top` most likely tokens.
    Ties rank as the best of them: rank = 1 + #tokens strictly more likely."""
    chosen = logprobs_V[token_id]
    result: PositionLogprobs = {token_id: Logprob(float(chosen), int((logprobs_V > chosen).sum()) + 1)}
    if num_top > 0:
        values_K, ids_K = logprobs_V.topk(min(num_top, logprobs_V.numel()))
        for rank, (value, top_id) in enumerate(zip(values_K.tolist(), ids_K.tolist(), strict=True), start=1):
            if top_id not in result:
                result[top_id] = Logprob(value, rank)
    return result


def prompt_logprobs(
    logits_nV: torch.Tensor, token_ids: Sequence[int], first_position: int, num_top: int
) -> list[PositionLogprobs]:
    """Logprobs of prompt tokens given the ones before them, from raw logits_nV [n, V] of the prefill
    rows at positions first_position.. (row i scores token first_position + i + 1). A prompt's
    first position has none (the engine's list starts with None, as vLLM's)."""
    logprobs_nV = torch.log_softmax(logits_nV.float(), dim=-1)
    return [
        position_logprobs(logprobs_nV[i], token_ids[first_position + i + 1], num_top)
        for i in range(logits_nV.shape[0])
    ]


class Sampler:
    """`Sampler(eos_token_id)(logits_SV, states) -> SamplerOutput`.

    A row with a grammar (SamplingState.grammar) samples only the tokens it allows. Should the
    other processors leave such a row nothing (min_tokens masking the EOS a finished grammar
    needs), the grammar wins: the row falls back to its masked raw logits.

    The EOS id (masked while fewer than min_tokens are out, unless ignore_eos) is given here once,
    for the model; a `SamplingState.eos_token_id` overrides it per sequence.

    Logprobs convention: `logprobs_mode="raw"` (default) returns log_softmax of the model's raw
    logits, before bias, penalties and temperature: what OpenAI clients expect and vLLM's default.
    "processed" returns them after bias/min_tokens/penalties, still before temperature.
    """

    def __init__(
        self, eos_token_id: int | None = None, logprobs_mode: Literal["raw", "processed"] = "raw"
    ) -> None:
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r} must be 'raw' or 'processed'")
        self.eos_token_id = eos_token_id
        self.logprobs_mode = logprobs_mode

    @torch.no_grad()
    def __call__(self, logits_SV: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """logits_SV: float32 [S, V], one row per state (S ≥ 0). Does not modify logits_SV."""
        if logits_SV.dim() != 2 or logits_SV.shape[0] != len(states):
            raise ValueError(f"logits must be [{len(states)}, vocab], got {tuple(logits_SV.shape)}")
        num_rows = logits_SV.shape[0]
        if num_rows == 0:
            return SamplerOutput([], [])
        raw_SV = logits_SV.float()
        logits_SV = self._process(raw_SV, states)

        want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        logprobs_RV = None
        if want:
            source_SV = raw_SV if self.logprobs_mode == "raw" else logits_SV
            logprobs_RV = torch.log_softmax(source_SV if len(want) == num_rows else source_SV[want], dim=-1)

        sampled = [i for i, s in enumerate(states) if not s.params.greedy]
        if len(sampled) == num_rows:
            token_ids = _race(self._warp(logits_SV, states).softmax(dim=-1), states)
        else:
            token_ids = logits_SV.argmax(dim=-1)  # greedy rows keep this; sampled rows overwrite it
            if sampled:
                rows = [states[i] for i in sampled]
                token_ids[sampled] = _race(self._warp(logits_SV[sampled], rows).softmax(dim=-1), rows)

        token_list = token_ids.tolist()
        logprobs: list[PositionLogprobs | None] = [None] * num_rows
        for r, i in enumerate(want):
            logprobs[i] = position_logprobs(logprobs_RV[r], token_list[i], states[i].params.logprobs)
        return SamplerOutput(token_list, logprobs)

    @torch.no_grad()
    def probs(self, logits_SV: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """The distribution each row samples from: float32 [S, V] after every processor, temperature
        and filter (one-hot at the argmax for greedy rows). Speculative decoding's rejection rule
        needs exactly this; tests check each knob through it. Draws no random numbers."""
        logits_SV = self._process(logits_SV.float(), states)
        probs_SV = torch.zeros_like(logits_SV)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        sampled = [i for i, s in enumerate(states) if not s.params.greedy]
        if greedy:
            probs_SV[greedy, logits_SV[greedy].argmax(dim=-1)] = 1.0
        if sampled:
            probs_SV[sampled] = self._warp(logits_SV[sampled], [states[i] for i in sampled]).softmax(dim=-1)
        return probs_SV

    def _process(self, raw_SV: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Grammar masks, logit_bias, min_tokens, penalties; returns raw_SV itself when no row
        needs any."""
        if not any(_needs_processing(s, len(s.output_token_ids)) for s in states):
            return raw_SV
        logits_SV = raw_SV.clone()  # copy only when some row changes its logits
        constrained = [i for i, s in enumerate(states) if s.grammar is not None]
        if constrained:
            grammars = [states[i].grammar for i in constrained]
            bias_RV = mask_bias(grammars, logits_SV.shape[1]).to(logits_SV.device)  # type: ignore[arg-type]
            _put(logits_SV, constrained, _take(logits_SV, constrained) + bias_RV)  # x + 0.0 == x
        self._apply_logit_bias(logits_SV, states)
        self._apply_min_tokens(logits_SV, states)
        self._apply_penalties(logits_SV, states)
        if constrained:
            empty = (_take(logits_SV, constrained).amax(dim=-1) == float("-inf")).tolist()
            for r in (r for r, e in enumerate(empty) if e):
                row = constrained[r]
                logits_SV[row] = raw_SV[row] + bias_RV[r]
        return logits_SV

    # --- logit processors (in place on the processed logits) ---

    @staticmethod
    def _apply_logit_bias(logits_SV: torch.Tensor, states: Sequence[SamplingState]) -> None:
        vocab_size = logits_SV.shape[1]
        for i, state in enumerate(states):
            bias = state.params.logit_bias
            if bias:
                if max(bias) >= vocab_size:  # the engine should have said so on arrival (check_token_ids)
                    raise SamplingParamsError(
                        "logit_bias", f"logit_bias token ids must be < vocab_size={vocab_size}"
                    )
                ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits_SV.device)
                values = torch.tensor(list(bias.values()), dtype=logits_SV.dtype, device=logits_SV.device)
                logits_SV[i, ids] += values

    def _apply_min_tokens(self, logits_SV: torch.Tensor, states: Sequence[SamplingState]) -> None:
        vocab_size = logits_SV.shape[1]
        for i, state in enumerate(states):
            params = state.params
            if len(state.output_token_ids) >= params.min_tokens:
                continue
            eos = state.eos_token_id if state.eos_token_id is not None else self.eos_token_id
            stop_ids = list(params.stop_token_ids)
            if eos is not None and not params.ignore_eos:
                stop_ids.append(eos)
            stop_ids = [t for t in stop_ids if t < vocab_size]
            if stop_ids:
                logits_SV[i, stop_ids] = float("-inf")

    @staticmethod
    def _apply_penalties(logits_SV: torch.Tensor, states: Sequence[SamplingState]) -> None:
        rows = [
            i
            for i, s in enumerate(states)
            if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0
            or s.params.frequency_penalty != 0.0
        ]
        if not rows:
            return
        num_rows, vocab_size = len(rows), logits_SV.shape[1]
        device = logits_SV.device
        # Token counts per row are gathered row by row (histories differ in length); the formulas
        # are then elementwise over the rows together.
        counts_RV = torch.zeros(num_rows, vocab_size, dtype=logits_SV.dtype, device=device)
        seen_RV = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        for r, i in enumerate(rows):
            output_ids = torch.tensor(states[i].output_token_ids, dtype=torch.long, device=device)
            counts_RV[r].index_add_(0, output_ids, torch.ones_like(output_ids, dtype=logits_SV.dtype))
            if states[i].params.repetition_penalty != 1.0:
                seen_RV[r, states[i].prompt_ids().to(device)] = True
        seen_RV |= counts_RV > 0

        def column(name: str) -> torch.Tensor:
            values = [[getattr(states[i].params, name)] for i in rows]
            return torch.tensor(values, dtype=logits_SV.dtype, device=device)

        sub_RV = logits_SV if num_rows == logits_SV.shape[0] else logits_SV[rows]
        repetition_R1 = column("repetition_penalty")
        # CTRL: a seen token's logit moves towards "less likely" whatever its sign
        penalised_RV = torch.where(sub_RV > 0, sub_RV / repetition_R1, sub_RV * repetition_R1)
        sub_RV = torch.where(seen_RV, penalised_RV, sub_RV)
        sub_RV -= column("frequency_penalty") * counts_RV
        sub_RV -= column("presence_penalty") * (counts_RV > 0).to(sub_RV.dtype)
        if num_rows == logits_SV.shape[0]:
            logits_SV.copy_(sub_RV)
        else:
            logits_SV[rows] = sub_RV

    # --- sampling ---

    @staticmethod
    def _warp(logits_RV: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Temperature, then top-k, top-p, min-p (filtered tokens get -inf). Returns a new tensor."""
        params = [s.params for s in states]
        device = logits_RV.device
        neg_inf = float("-inf")
        vocab_size = logits_RV.shape[1]
        temperature_R1 = torch.tensor([[p.temperature] for p in params], dtype=logits_RV.dtype, device=device)
        logits_RV = logits_RV / temperature_R1  # a new tensor: the filters below may write in place

        # Each filter lowers some logits to -inf. Rows a filter does not apply to get a threshold of
        # -inf (nothing masked), so every mask is one elementwise pass over the whole batch.
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        top_k_rows = [r for r, k in enumerate(top_k) if k]
        if top_k_rows:
            # The k-th largest value is exact whatever the batch (topk's tie order never matters here);
            # every token tied with it stays, as in transformers' TopKLogitsWarper.
            values_RK = _take(logits_RV, top_k_rows).topk(max(top_k[r] for r in top_k_rows), dim=-1).values
            index_R1 = torch.tensor([[top_k[r] - 1] for r in top_k_rows], device=device)
            logits_RV.masked_fill_(
                logits_RV < _spread(values_RK.gather(1, index_R1), top_k_rows, len(params)), neg_inf
            )

        top_p_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            sub_RV = _take(logits_RV, top_p_rows)
            probs_RV = sub_RV.softmax(dim=-1)
            top_p_R1 = torch.tensor([[params[r].top_p] for r in top_p_rows], device=device)
            cutoff_R1 = _top_p_cutoff(probs_RV, top_p_R1)
            _put(logits_RV, top_p_rows, sub_RV.masked_fill(probs_RV < cutoff_R1, neg_inf))

        min_p_rows = [r for r, p in enumerate(params) if p.min_p > 0.0]
        if min_p_rows:
            # p_i < min_p * p_max  ⇔  logit_i < logit_max + log(min_p): no softmax needed
            log_min_p_R1 = torch.tensor([[math.log(params[r].min_p)] for r in min_p_rows], device=device)
            threshold_R1 = _take(logits_RV, min_p_rows).max(dim=-1, keepdim=True).values + log_min_p_R1
            logits_RV.masked_fill_(logits_RV < _spread(threshold_R1, min_p_rows, len(params)), neg_inf)

        return logits_RV


def _race(probs_RV: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """One token per row drawn from probs_RV with that row's own generator. Returns int64 [R].

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. picks i with probability p_i.
    E = -log U, U drawn per row from that row's CPU generator (uniform_ is several times cheaper
    than exponential_ on CPU), wherever the probabilities live."""
    uniform_RV = torch.empty(probs_RV.shape, dtype=probs_RV.dtype)
    for r, state in enumerate(states):
        uniform_RV[r].uniform_(generator=state.generator)
    # U = 0 gives E = inf (p/E = 0: never chosen); the clamp keeps E > 0 so a 0 prob never becomes NaN.
    exponential_RV = uniform_RV.log_().neg_().clamp_(min=torch.finfo(uniform_RV.dtype).tiny)
    return (probs_RV / exponential_RV.to(probs_RV.device)).argmax(dim=-1)


def _take(x_RV: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x_RV if len(rows) == x_RV.shape[0] else x_RV[rows]


def _put(x_RV: torch.Tensor, rows: list[int], values_RV: torch.Tensor) -> None:
    if len(rows) == x_RV.shape[0]:
        x_RV.copy_(values_RV)
    else:
        x_RV[rows] = values_RV


def _spread(values_R1: torch.Tensor, rows: list[int], num_rows: int) -> torch.Tensor:
    """[R, 1] thresholds for `rows` → [num_rows, 1], -inf (mask nothing) elsewhere."""
    if len(rows) == num_rows:
        return values_R1
    full_N1 = torch.full((num_rows, 1), float("-inf"), dtype=values_R1.dtype, device=values_R1.device)
    full_N1[rows] = values_R1
    return full_N1


def _needs_processing(state: SamplingState, num_output: int) -> bool:
    p = state.params
    return bool(
        state.grammar is not None
        or p.logit_bias
        or num_output < p.min_tokens
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
    )


def _top_p_cutoff(probs_RV: torch.Tensor, top_p_R1: torch.Tensor) -> torch.Tensor:
    """The smallest probability top-p keeps, per row [R, 1]: the nucleus is the shortest
    most-likely-first prefix whose mass reaches top_p (ties with its last token stay too).

    Only tokens with p ≥ (1 - top_p) / V can be in it (the others hold less than 1 - top_p in all),
    so only the C most likely, C the largest such count in the batch, are sorted (topk): far cheaper
    than sorting V for peaked distributions. A row's prefix sums over its own candidates are the
    same whatever C, so the cutoff does not depend on the batch."""
    vocab_size = probs_RV.shape[1]
    num_candidates_R1 = (probs_RV >= (1.0 - top_p_R1) / vocab_size).sum(dim=-1, keepdim=True)
    sorted_RC = probs_RV.topk(int(num_candidates_R1.max()), dim=-1).values
    cumulative_RC = sorted_RC.cumsum(dim=-1)
    mass_before_RC = torch.cat([torch.zeros_like(cumulative_RC[:, :1]), cumulative_RC[:, :-1]], dim=-1)
    position_C = torch.arange(sorted_RC.shape[1], device=probs_RV.device)
    # keep token j while the mass before it is below top_p (so the first token always stays)
    kept_RC = (mass_before_RC < top_p_R1) & (position_C < num_candidates_R1)
    return sorted_RC.gather(1, kept_RC.sum(dim=-1, keepdim=True) - 1)
