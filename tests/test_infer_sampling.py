"""The sampler against a plain per-token float64 reference, knob by knob; seeded reproducibility;
bit-for-bit batch invariance; and a chi-square test that sampling follows the intended distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import torch_threads

from moetron.infer.sampling import (
    Sampler,
    SamplingState,
    make_generator,
    position_logprobs,
    prompt_logprobs,
)
from moetron.infer.sampling_params import SamplingParams, SamplingParamsError

EOS = 3
VOCAB = 50


def reference_probs(
    logits: list[float], params: SamplingParams, prompt: list[int], output: list[int], eos: int
) -> list[float]:
    """The distribution one token is drawn from, written out token by token (float64)."""
    x = [float(v) for v in logits]
    vocab = len(x)
    for token, bias in params.logit_bias.items():
        x[token] += bias
    if len(output) < params.min_tokens:
        for token in [*params.stop_token_ids, *([] if params.ignore_eos else [eos])]:
            x[token] = -math.inf
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            x[token] = (
                x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
            )
    for token in set(output):
        x[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    if params.temperature == 0:
        best = max(range(vocab), key=lambda t: (x[t], -t))
        return [1.0 if t == best else 0.0 for t in range(vocab)]
    x = [v / params.temperature for v in x]
    if 0 < params.top_k < vocab:
        kth = sorted(x, reverse=True)[params.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]

    def softmax(values: list[float]) -> list[float]:
        top = max(values)
        e = [math.exp(v - top) if v > -math.inf else 0.0 for v in values]
        return [v / sum(e) for v in e]

    p = softmax(x)
    if params.top_p < 1.0:
        # the smallest most-likely-first prefix whose mass reaches top_p
        mass, last = 0.0, None
        for t in sorted(range(vocab), key=lambda t: -p[t]):
            if mass >= params.top_p:
                break
            mass, last = mass + p[t], t
        x = [v if p[t] >= p[last] else -math.inf for t, v in enumerate(x)]
        p = softmax(x)
    if params.min_p > 0:
        x = [v if p[t] >= params.min_p * max(p) else -math.inf for t, v in enumerate(x)]
        p = softmax(x)
    return p


def _state(params: SamplingParams, prompt: list[int], output: list[int], seed: int = 0, index: int = 0):
    return SamplingState(params, prompt, output, make_generator(seed, index) if not params.greedy else None)


def _history(rng: random.Random, length: int, vocab: int = VOCAB) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


KNOBS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "top_k+top_p+min_p": dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
    "repetition>1": dict(repetition_penalty=1.5),
    "repetition<1": dict(repetition_penalty=0.7),
    "presence+frequency": dict(presence_penalty=0.8, frequency_penalty=0.5),
    "negative penalties": dict(presence_penalty=-1.0, frequency_penalty=-0.3),
    "logit_bias": dict(logit_bias={5: 10.0, 6: -100.0, 7: 2.5}),
    "min_tokens": dict(min_tokens=12, max_tokens=64, stop_token_ids=[8, 9]),
    "min_tokens ignore_eos": dict(min_tokens=12, max_tokens=64, stop_token_ids=[8], ignore_eos=True),
    "greedy + penalties": dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=1.0),
    "everything": dict(
        temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
        presence_penalty=0.3, frequency_penalty=0.2, logit_bias={1: 3.0}, min_tokens=12, max_tokens=64, stop_token_ids=[2],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", KNOBS)
def test_each_knob_matches_reference(name: str) -> None:
    rng = random.Random(name)
    torch.manual_seed(len(name))
    params = SamplingParams(**KNOBS[name])
    sampler = Sampler(eos_token_id=EOS)
    logits_SV = torch.randn(6, VOCAB) * 2.5
    histories = [(_history(rng, 12), _history(rng, rng.randrange(0, 25))) for _ in range(6)]
    states = [_state(params, prompt, output) for prompt, output in histories]
    probs_SV = sampler.probs(logits_SV, states)
    for row, (prompt, output) in enumerate(histories):
        expected = torch.tensor(
            reference_probs(logits_SV[row].tolist(), params, prompt, output, EOS), dtype=torch.float64
        )
        # filtered tokens get exactly 0 (a kept one may underflow float32 too, e.g. under a -100 bias)
        assert (probs_SV[row][expected == 0] == 0).all(), f"row {row}: a filtered token kept"
        torch.testing.assert_close(probs_SV[row].double(), expected, atol=1e-6, rtol=1e-5)
        if params.min_tokens > len(output):
            masked = [*params.stop_token_ids, *([] if params.ignore_eos else [EOS])]
            assert probs_SV[row, masked].sum() == 0
    # the sampled token is always one the distribution allows
    tokens = sampler(logits_SV, states).token_ids
    assert all(probs_SV[row, token] > 0 for row, token in enumerate(tokens))


def test_greedy_is_argmax_and_draws_nothing() -> None:
    logits_SV = torch.randn(4, VOCAB)
    params = SamplingParams(temperature=0.0)
    generator = make_generator(1, 0)
    before = generator.get_state()
    states = [SamplingState(params, [1], [], generator) for _ in range(4)]
    out = Sampler(EOS)(logits_SV, states)
    assert out.token_ids == logits_SV.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 4
    assert torch.equal(generator.get_state(), before)


def test_top_k_top_p_keep_ties() -> None:
    logits_SV = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    probs = Sampler().probs(logits_SV, [_state(SamplingParams(top_k=2), [], [])])[0]
    assert (probs > 0).tolist() == [True, True, True, True, False, False]  # ties with the 2nd stay
    probs = Sampler().probs(logits_SV, [_state(SamplingParams(top_p=0.5), [], [])])[0]
    assert (probs > 0).tolist() == [True, True, True, True, False, False]


def test_logprobs_from_raw_logits() -> None:
    torch.manual_seed(0)
    logits_SV = torch.randn(3, VOCAB) * 2
    biased = SamplingParams(temperature=0.0, logprobs=5, logit_bias={11: 100.0})
    plain = SamplingParams(temperature=0.5, logprobs=3, seed=7)
    only_chosen = SamplingParams(temperature=0.5, logprobs=0)
    states = [_state(biased, [], []), _state(plain, [], []), _state(only_chosen, [], [])]
    out = Sampler(EOS)(logits_SV, states)
    raw_SV = torch.log_softmax(logits_SV.double(), dim=-1)
    assert out.token_ids[0] == 11  # the bias decides the token...
    for row, top in enumerate((5, 3, 0)):
        chosen = out.token_ids[row]
        entry = out.logprobs[row]
        # ...but logprobs and ranks are those of the raw model distribution
        order = raw_SV[row].argsort(descending=True).tolist()
        assert entry[chosen].rank == order.index(chosen) + 1
        assert entry[chosen].logprob == pytest.approx(raw_SV[row, chosen].item(), abs=1e-5)
        expected_top = set(order[:top]) | {chosen}
        assert set(entry) == expected_top
        for token in order[:top]:
            assert entry[token].rank == order.index(token) + 1
            assert entry[token].logprob == pytest.approx(raw_SV[row, token].item(), abs=1e-5)
    # "processed" mode reflects the bias (before temperature)
    out = Sampler(EOS, logprobs_mode="processed")(logits_SV[:1], states[:1])
    assert out.logprobs[0][11].rank == 1 and out.logprobs[0][11].logprob == pytest.approx(0.0, abs=1e-5)


def test_prompt_logprobs() -> None:
    logits_TV = torch.randn(3, VOCAB)  # rows at positions 0..2 of a 4-token prompt
    prompt = [5, 9, 2, 7]
    result = prompt_logprobs(logits_TV, prompt, 0, 2)
    assert len(result) == 3
    for t in range(1, 4):
        expected = torch.log_softmax(logits_TV[t - 1], dim=-1)[prompt[t]].item()
        assert result[t - 1][prompt[t]].logprob == pytest.approx(expected)
        assert len(result[t - 1]) in (2, 3)
    # a later chunk: rows at positions 2.. score tokens 3..
    (last,) = prompt_logprobs(logits_TV[2:], prompt, 2, 0)
    assert last[prompt[3]].logprob == result[2][prompt[3]].logprob
    assert position_logprobs(torch.tensor([0.0, 0.0, -1.0]), 1, 0)[1].rank == 1  # ties rank as the best


def _run(states: list[SamplingState], logits_steps: list[torch.Tensor], order: list[int]) -> list:
    """Sample len(logits_steps) steps for `states` presented in `order`; per state, what it got."""
    sampler = Sampler(EOS)
    got: list[list] = [[] for _ in states]
    for logits_SV in logits_steps:
        out = sampler(logits_SV[order], [states[i] for i in order])
        for row, i in enumerate(order):
            got[i].append((out.token_ids[row], out.logprobs[row]))
            states[i].output_token_ids.append(out.token_ids[row])
    return got


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 1.0, 1.7]),
        top_k=rng.choice([0, 1, 5, 40]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.4]),
        logprobs=rng.choice([None, 0, 4]),
        min_tokens=rng.choice([0, 2]),
        logit_bias=rng.choice([{}, {4: 2.0}]),
    )


@pytest.mark.parametrize("trial", range(4))
def test_batch_invariance(trial: int) -> None:
    """A row's tokens and logprobs are bit-identical alone and in any batch of random others."""
    rng = random.Random(trial)
    vocab = 1001  # odd: rows start at unaligned offsets in the batched tensor
    num_rows, num_steps = 9, 4
    torch.manual_seed(trial)
    logits_steps = [torch.randn(num_rows, vocab) * 3 for _ in range(num_steps)]
    params = [_random_params(rng) for _ in range(num_rows)]
    histories = [(_history(rng, 20, vocab), _history(rng, 5, vocab)) for _ in range(num_rows)]

    def fresh(i: int) -> SamplingState:
        prompt, output = histories[i]
        return SamplingState(params[i], prompt, list(output), make_generator(1000 + i, trial))

    alone = [_run([fresh(i)], [x[i : i + 1] for x in logits_steps], [0])[0] for i in range(num_rows)]
    for _ in range(3):
        order = list(range(num_rows))
        rng.shuffle(order)
        batched = _run([fresh(i) for i in range(num_rows)], logits_steps, order)
        for i in range(num_rows):
            assert batched[i] == alone[i], f"row {i} ({params[i]}) depends on its batch"


def test_seeded_reproducibility() -> None:
    logits_SV = torch.zeros(1, 1000)  # uniform: every draw depends only on the generator
    params = SamplingParams(temperature=1.0)

    def tokens(generator: torch.Generator | None) -> list[int]:
        state = SamplingState(params, [], [], generator)
        return [Sampler()(logits_SV, [state]).token_ids[0] for _ in range(20)]

    assert tokens(make_generator(42, 0)) == tokens(make_generator(42, 0))
    assert tokens(make_generator(42, 0)) != tokens(make_generator(42, 1))
    assert tokens(make_generator(42, 0)) != tokens(make_generator(43, 0))
    assert make_generator(None, 0) is None
    torch.manual_seed(5)
    first = tokens(None)  # unseeded: a fresh generator from the global RNG...
    assert tokens(None) != first  # ...a different one each time,
    torch.manual_seed(5)
    assert tokens(None) == first  # which torch.manual_seed reproduces
    with pytest.raises(ValueError, match="sample_index"):
        make_generator(1, -1)


CHI2_P_THRESHOLD = 1e-3


@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=1.0), dict(temperature=0.6, top_k=5), dict(temperature=1.4, top_p=0.8, min_p=0.02)],
)
def test_sampling_follows_distribution(knobs: dict) -> None:
    """Chi-square goodness of fit of 40,000 seeded draws against the reference distribution; fails
    if the p-value is below 1e-3 (fixed seeds, so it is deterministic, not flaky)."""
    with torch_threads(1):  # many small calls: threads only add overhead
        _check_distribution(knobs)


def _check_distribution(knobs: dict) -> None:
    params = SamplingParams(**knobs)
    logits_V = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2, -2.0, 0.8])
    expected = torch.tensor(reference_probs(logits_V.tolist(), params, [], [], EOS), dtype=torch.float64)
    num_rows, num_steps = 4000, 10
    states = [_state(params, [], [], seed=7, index=i) for i in range(num_rows)]
    sampler = Sampler(EOS)
    counts = torch.zeros(len(logits_V), dtype=torch.float64)
    for _ in range(num_steps):
        tokens = sampler(logits_V.expand(num_rows, -1), states).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=len(logits_V)).double()
    assert counts[expected == 0].sum() == 0, "sampled a filtered-out token"
    kept = expected > 0
    total = counts.sum()
    chi2 = ((counts[kept] - total * expected[kept]) ** 2 / (total * expected[kept])).sum()
    dof = int(kept.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0), chi2 / 2).item()
    assert p_value > CHI2_P_THRESHOLD, f"chi2={chi2:.1f} with {dof} dof: p={p_value:.2e}"


def test_bad_inputs() -> None:
    sampler = Sampler(EOS)
    state = _state(SamplingParams(logit_bias={VOCAB + 3: 1.0}), [], [])
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        sampler(torch.zeros(1, VOCAB), [state])
    with pytest.raises(ValueError, match="logits must be"):
        sampler(torch.zeros(2, VOCAB), [state])
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(EOS, logprobs_mode="scaled")
    assert sampler(torch.zeros(0, VOCAB), []).token_ids == []
