"""Speculative decoding: the n-gram proposer against a brute-force search; greedy speculation equals
greedy decoding for both proposers; rejection sampling leaves the target distribution intact
(chi-square against exact distributions: of a single token, and of the first two tokens of a tiny
model computed by enumeration)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import CHI2_P_THRESHOLD, chi_square_p_value

from moetron.config import ModelConfig, MoEConfig
from moetron.infer.sampling import Sampler, SamplingState
from moetron.infer.sampling_params import SamplingParams
from moetron.infer.speculative import (
    DraftModelProposer,
    NgramProposer,
    SpeculativeStats,
    rejection_sample,
    speculative_generate,
    verify_greedy,
)
from moetron.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(vocab: int, seed: int, init_std: float = 0.4) -> Transformer:
    cfg = ModelConfig(
        vocab_size=vocab, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=64, init_std=init_std,
        moe=MoEConfig(num_experts=2, top_k=1, expert_hidden_dim=16),
    )  # fmt: skip
    torch.manual_seed(seed)
    return Transformer.from_config(cfg).eval()


class _Memo(torch.nn.Module):
    """The same model with its logits cached per input: the statistical tests revisit the same few
    contexts thousands of times."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model, self.cfg, self._cache = model, model.cfg, {}

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        key = tuple(map(tuple, input_ids_BT.tolist()))
        if key not in self._cache:
            self._cache[key] = self.model(input_ids_BT)
        return self._cache[key]


def _brute_force_ngram(ids: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    for n in range(n_max, n_min - 1, -1):
        if len(ids) <= n:
            continue
        for start in range(len(ids) - n - 1, -1, -1):  # most recent earlier occurrence first
            if ids[start : start + n] == ids[-n:]:
                return ids[start + n : start + n + k]
    return []


def test_ngram_proposer() -> None:
    proposer = NgramProposer(n_min=1, n_max=3, num_speculative_tokens=3)
    assert proposer.propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]
    assert proposer.propose([5, 1, 2, 9, 1, 2, 7, 2]) == [7, 2]  # longest n, most recent; cut at the end
    assert proposer.propose([1, 2, 3]) == []
    assert proposer.propose([7]) == []
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        n_min, n_max = rng.choice([(1, 1), (1, 4), (2, 3)])
        k = rng.randrange(1, 6)
        expected = _brute_force_ngram(ids, n_min, n_max, k)
        assert NgramProposer(n_min, n_max, k).propose(ids) == expected, ids
    with pytest.raises(ValueError, match="n_min"):
        NgramProposer(n_min=3, n_max=2)


def test_verify_greedy() -> None:
    logits_KpV = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_greedy(logits_KpV, [1, 0]) == [1, 0, 2]  # all accepted + bonus
    assert verify_greedy(logits_KpV, [1, 2]) == [1, 0]  # second rejected, corrected
    assert verify_greedy(logits_KpV, [0, 0]) == [1]
    with pytest.raises(ValueError, match="k\\+1"):
        verify_greedy(logits_KpV, [1])


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_preserves_target(point_mass: bool) -> None:
    """Draft x ~ q (or a fixed x: a point mass), then the rule: the first token is distributed as p;
    the second (bonus or after acceptance) as p's second row."""
    p_KpV = torch.tensor(
        [[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [0.1, 0.1, 0.1, 0.2, 0.2, 0.3]], dtype=torch.float64
    )
    q_KV = torch.tensor([[0.1, 0.3, 0.05, 0.25, 0.2, 0.1]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    first, second = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for _ in range(5_000):
        token = 1 if point_mass else int(torch.multinomial(q_KV[0], 1, generator=generator))
        out = rejection_sample(p_KpV, None if point_mass else q_KV, [token], generator)
        first[out[0]] += 1
        if len(out) == 2:
            second[out[1]] += 1
    assert chi_square_p_value(first, p_KpV[0]) > CHI2_P_THRESHOLD
    assert chi_square_p_value(second, p_KpV[1]) > CHI2_P_THRESHOLD


def _plain_greedy(
    model: Transformer, prompt: list[int], params: SamplingParams, max_tokens: int
) -> list[int]:
    sampler, output = Sampler(), []
    for _ in range(max_tokens):
        logits_1V = model(torch.tensor([prompt + output]))[:, -1]
        output.append(sampler(logits_1V, [SamplingState(params, prompt, output)]).token_ids[0])
    return output


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.5)]
)
def test_greedy_speculation_equals_greedy_decoding(params: SamplingParams) -> None:
    torch.set_default_dtype(torch.float64)  # no argmax may flip on a rounding difference between forwards
    try:
        target, other = _tiny(32, seed=0), _tiny(32, seed=1)
    finally:
        torch.set_default_dtype(torch.float32)
    proposers = {
        "ngram": NgramProposer(1, 3, num_speculative_tokens=4),
        "draft=target": DraftModelProposer(target, num_speculative_tokens=3),
        "draft=other": DraftModelProposer(other, num_speculative_tokens=3),
    }
    rng = random.Random(0)
    for trial in range(2):
        prompt = [rng.randrange(32) for _ in range(6)] * 2  # repeats give the n-gram proposer matches
        expected = _plain_greedy(target, prompt, params, 16)
        for name, proposer in proposers.items():
            stats = SpeculativeStats()
            got = speculative_generate(target, prompt, params, proposer, 16, stats=stats)
            assert got == expected, f"{name}, trial {trial}"
            if name == "draft=target" and params.repetition_penalty == 1.0:  # the draft skips penalties
                assert stats.acceptance_rate == 1.0 and stats.num_steps == 4  # 3 accepted + 1 bonus a step


def _exact_pair_distribution(model: Transformer, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(first two tokens = a, b) = p(a | prompt) p(b | prompt, a), by enumeration: [V*V]."""
    vocab = model.cfg.vocab_size
    sampler = Sampler()
    with torch.no_grad():
        p1 = sampler.probs(model(torch.tensor([prompt]))[:, -1], [SamplingState(params, prompt, [])])[0]
        rows = model(torch.tensor([[*prompt, a] for a in range(vocab)]))[:, -1]
        p2 = torch.cat(
            [sampler.probs(rows[a : a + 1], [SamplingState(params, prompt, [a])]) for a in range(vocab)]
        )
    return (p1.double()[:, None] * p2.double()).reshape(-1)


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_speculative_sampling_follows_target(which: str) -> None:
    """The first two generated tokens over 1,200 seeded runs against the exact pair distribution
    (36 cells, small ones pooled); fails if the chi-square p-value is below 1e-3."""
    vocab = 6
    target = _Memo(_tiny(vocab, seed=3, init_std=0.6))
    # the draft case also runs a history-dependent processor (the target's distribution at each
    # checked position must see the draft tokens before it)
    params = SamplingParams(temperature=0.9, top_k=5, repetition_penalty=1.2 if which == "draft" else 1.0)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # the n-gram proposer offers 3, 1, ... here
    if which == "ngram":
        proposer = NgramProposer(1, 3, num_speculative_tokens=3)
    else:
        proposer = DraftModelProposer(_Memo(_tiny(vocab, seed=4, init_std=0.6)), num_speculative_tokens=3)
    expected = _exact_pair_distribution(target, prompt, params)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    stats = SpeculativeStats()
    for seed in range(1200):
        generator = torch.Generator().manual_seed(seed)
        a, b = speculative_generate(target, prompt, params, proposer, 3, generator=generator, stats=stats)[:2]
        counts[a * vocab + b] += 1
    assert 0.05 < stats.acceptance_rate < 0.95  # both the accept and the reject paths ran
    assert chi_square_p_value(counts, expected) > CHI2_P_THRESHOLD


def test_pair_enumeration_is_a_distribution() -> None:
    target = _tiny(5, seed=0)
    probs = _exact_pair_distribution(target, [1, 2], SamplingParams(temperature=0.7))
    assert probs.sum().item() == pytest.approx(1.0) and len(probs) == 25
    assert all(v >= 0 for v in probs.tolist()) and len(list(itertools.product(range(5), repeat=2))) == 25
