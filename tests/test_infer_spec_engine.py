"""Speculative decoding in the engine: greedy outputs (tokens, logprobs, text, finish reasons) are
identical to plain decoding for n-gram and draft-model proposers; sampled outputs follow the
target's exact distribution (chi-square against enumeration); blocks are all freed and the prefix
cache holds no rejected tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CHI2_P_THRESHOLD, chi_square_p_value

from moetron.config import EngineConfig, ModelConfig, MoEConfig
from moetron.data.tokenizer import train_bpe
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling import Sampler, SamplingState
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 30
CFG = ModelConfig(
    vocab_size=320, dim=48, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=160,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=32),
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(CFG).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=CFG.vocab_size)


def make_engine(model, tokenizer=None, draft=None, **overrides) -> LLMEngine:
    options = dict(num_kv_blocks=96, block_size=4, max_num_batched_tokens=64)
    options.update(overrides)
    return LLMEngine(model, tokenizer, EngineConfig(**options), draft_model=draft)


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list:
    ids = [engine.add_request(p, params) for p, params in requests]
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[i].outputs[0] for i in ids]


def repetitive_prompts(tokenizer) -> list[list[int]]:
    text = "the cat sleeps in the sun. the cat sleeps in the sun. the cat"
    gen = torch.Generator().manual_seed(3)
    other = torch.randint(7, CFG.vocab_size, (6,), generator=gen).tolist()
    return [tokenizer.encode(text), other * 3, tokenizer.encode("the quick brown fox jumps over the")]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_is_identical_to_plain_decoding(model, tokenizer, method: str) -> None:
    prompts = repetitive_prompts(tokenizer)
    plain = make_engine(model, tokenizer)
    full = run(plain, [(p, SamplingParams(temperature=0.0, max_tokens=24)) for p in prompts])
    stop = full[2].text[len(full[2].text) // 2 :][:3]  # a stop string inside prompt 2's output
    assert stop
    requests = [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=7, logprobs=0)),  # ends mid-run
        (prompts[2], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], logprobs=1)),
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3)),
    ]
    expected = run(make_engine(model, tokenizer), requests)
    # the target itself as draft: every proposal is accepted, so stops land mid-acceptance
    spec = make_engine(
        model, tokenizer, draft=model if method == "draft" else None, speculative_method=method
    )
    got = run(spec, requests)
    for want, out in zip(expected, got, strict=True):
        assert out.token_ids == want.token_ids
        assert out.text == want.text
        assert (out.finish_reason, out.stop_reason) == (want.finish_reason, want.stop_reason)
        assert out.logprobs == want.logprobs  # bit-identical: same rows, batch-invariant kernels
    assert got[2].finish_reason == "stop" and got[1].finish_reason == "length"
    stats = spec.get_stats()
    assert stats.spec_accepted_tokens_total > 0
    assert 0 < stats.spec_acceptance_rate <= 1
    assert stats.kv_blocks_used == 0


def test_blocks_freed_and_prefix_cache_clean(model, tokenizer) -> None:
    prompts = repetitive_prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    spec = make_engine(model, tokenizer, draft=None, speculative_method="ngram", num_speculative_tokens=5)
    first = run(spec, [(p, params) for p in prompts])
    assert spec.get_stats().kv_blocks_used == 0
    assert spec.get_stats().spec_proposed_tokens_total > spec.get_stats().spec_accepted_tokens_total
    # every registered block holds exactly the tokens some sequence really has there
    bm = spec.block_manager
    real = [p + o.token_ids for p, o in zip(prompts, first, strict=True)]
    for block, tokens in enumerate(bm.tokens):
        if tokens is not None:
            assert any(
                tuple(seq[i : i + len(tokens)]) == tokens for seq in real for i in range(0, len(seq), 4)
            ), f"block {block} holds tokens no sequence produced"
    # the same prompts again hit the cache (output blocks included) and produce the same tokens
    again = run(spec, [(p + o.token_ids[:9], params) for p, o in zip(prompts, first, strict=True)])
    plain = run(
        make_engine(model, tokenizer),
        [(p + o.token_ids[:9], params) for p, o in zip(prompts, first, strict=True)],
    )
    assert [o.token_ids for o in again] == [o.token_ids for o in plain]
    assert spec.get_stats().prefix_cache_hit_tokens_total > 0
    assert spec.get_stats().kv_blocks_used == 0


def test_config_errors(model) -> None:
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig(speculative_method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="ngram_min"):
        EngineConfig(speculative_method="ngram", ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="draft_model_dir"):
        make_engine(model, speculative_method="draft")
    other = Transformer.from_config(ModelConfig(
        vocab_size=100, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=64,
        moe=MoEConfig(num_experts=2, top_k=1, expert_hidden_dim=16),
    ))  # fmt: skip
    with pytest.raises(ValueError, match="vocab_size"):
        make_engine(model, draft=other, speculative_method="draft")


# --- sampled outputs keep the target's distribution ---

VOCAB = 6
PROMPT = [
    1,
    2,
    3,
    4,
    5,
    0,
    1,
    2,
    3,
    4,
    5,
    0,
    1,
]  # every token seen before: the n-gram proposer always proposes
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.4, max_tokens=4)


def _tiny(seed: int) -> Transformer:
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=64, init_std=0.4,
        moe=MoEConfig(num_experts=2, top_k=1, expert_hidden_dim=16),
    )  # fmt: skip
    torch.manual_seed(seed)
    return Transformer.from_config(cfg).eval()


@torch.no_grad()
def _exact_second_and_third(model: Transformer, params: SamplingParams) -> torch.Tensor:
    """P(t2, t3) = sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2), every factor the Sampler's
    distribution (penalties with the right history) on a full-recompute forward: [V, V]."""
    sampler = Sampler()

    def dist(output: list[int]) -> torch.Tensor:
        logits_1V = model(torch.tensor([PROMPT + output]))[:, -1].float()
        return sampler.probs(logits_1V, [SamplingState(params, PROMPT, output)])[0].double()

    joint_VV = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    p1 = dist([])
    for t1 in range(VOCAB):
        p2 = dist([t1])
        for t2 in range(VOCAB):
            if p1[t1] * p2[t2] > 0:
                joint_VV[t2] += p1[t1] * p2[t2] * dist([t1, t2])
    return joint_VV


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_speculation_keeps_the_target_distribution(method: str) -> None:
    """Tokens 2 and 3 (token 1 comes from the prefill; speculation starts at the first decode): their
    joint distribution over many seeded requests, with speculation, against the exact one."""
    target = _tiny(0)
    draft = _tiny(1) if method == "draft" else None  # a different model: real rejections
    engine = LLMEngine(
        target, None,
        EngineConfig(num_kv_blocks=700, block_size=4, max_num_seqs=128, max_num_batched_tokens=2048,
                     speculative_method=method, num_speculative_tokens=2),
        draft_model=draft,
    )  # fmt: skip
    num = 3000
    outs = run(engine, [(PROMPT, _seeded(i)) for i in range(num)])
    counts_VV = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for out in outs:
        counts_VV[out.token_ids[1], out.token_ids[2]] += 1
    stats = engine.get_stats()
    assert stats.spec_proposed_tokens_total > num and 0 < stats.spec_acceptance_rate < 1
    p = chi_square_p_value(counts_VV.flatten(), _exact_second_and_third(target, SAMPLED).flatten())
    assert p > CHI2_P_THRESHOLD, f"chi-square p={p:.2e}: speculative samples differ from the target's"
    # per-request seeds stay reproducible with speculation
    again = run(engine, [(PROMPT, _seeded(i)) for i in range(8)])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:8]]


def _seeded(seed: int) -> SamplingParams:
    return dataclasses.replace(SAMPLED, seed=seed)


def test_short_budget_and_pool_fall_back_and_preempt(model, tokenizer) -> None:
    """A tight token budget (k = 0 fallback while others prefill) and a KV pool small enough to
    preempt: still the plain engine's tokens, and every block comes back."""
    prompts = [*repetitive_prompts(tokenizer), [5, 6, 7, 8] * 4]
    requests = [
        (p, SamplingParams(temperature=0.0, max_tokens=20, n=2 if i == 3 else 1))
        for i, p in enumerate(prompts)
    ]
    small = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=12, max_model_len=64)
    want = run(make_engine(model, tokenizer, **small), requests)
    spec = make_engine(model, tokenizer, speculative_method="ngram", **small)
    got = run(spec, requests)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = spec.get_stats()
    assert stats.num_preempted_total > 0 and stats.spec_accepted_tokens_total > 0
    assert stats.kv_blocks_used == 0


def test_draft_model_dir_loads_a_saved_draft(model, tokenizer, tmp_path) -> None:
    from moetron.convert.hf import save_pretrained

    save_pretrained(model, tmp_path / "draft")
    requests = [(p, SamplingParams(temperature=0.0, max_tokens=12)) for p in repetitive_prompts(tokenizer)]
    spec = make_engine(model, tokenizer, speculative_method="draft", draft_model_dir=str(tmp_path / "draft"))
    got = run(spec, requests)
    assert [o.token_ids for o in got] == [o.token_ids for o in run(make_engine(model, tokenizer), requests)]
    assert spec.get_stats().spec_acceptance_rate == 1.0  # the draft is the target itself
