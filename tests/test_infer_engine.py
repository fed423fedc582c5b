"""LLMEngine / LLM end to end on a tiny random MoE model: continuous batching against a full
recompute, abort, n > 1, finish reasons, prompt validation, preemption, stats, prompt logprobs, and
the dtype a half-precision checkpoint is served in."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import reference_greedy

from moetron import hardware
from moetron.config import EngineConfig, ModelConfig, MoEConfig
from moetron.convert.hf import save_pretrained
from moetron.data.tokenizer import train_bpe
from moetron.infer import fused_layers
from moetron.infer.engine import LLMEngine
from moetron.infer.llm import LLM
from moetron.infer.sampling_params import SamplingParams
from moetron.model import Transformer

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 30
CFG = ModelConfig(
    vocab_size=320, dim=48, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=160,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=32),
)  # fmt: skip
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer.from_config(CFG).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=CFG.vocab_size)


def make_engine(model: Transformer, tokenizer=None, **overrides) -> LLMEngine:
    options = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=48)
    options.update(overrides)
    return LLMEngine(model, tokenizer, EngineConfig(**options))


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(7, CFG.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def run_to_completion(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


@pytest.mark.parametrize("invariant", [True, False], ids=["batch-invariant", "sdpa"])
def test_continuous_batching_matches_full_recompute(model, invariant: bool) -> None:
    engine = make_engine(model, batch_invariant=invariant)
    first = prompts(5, 30, 61)
    later = prompts(12, 44, seed=2)
    ids = [engine.add_request(p, GREEDY) for p in first]
    finished = {}
    for _ in range(3):  # the first requests are mid-prefill or decoding when the others arrive
        for out in engine.step():
            assert not out.finished
    assert engine.get_stats().num_running == 3
    ids += [engine.add_request(p, GREEDY) for p in later]
    finished = run_to_completion(engine)
    for request_id, prompt in zip(ids, first + later, strict=True):
        out = finished[request_id].outputs[0]
        assert out.token_ids == reference_greedy(model, prompt, 10)
        assert out.finish_reason == "length"
    stats = engine.get_stats()
    assert stats.kv_blocks_used == 0 and stats.generation_tokens_total == 50


def test_llm_generate_text_in_input_order(model, tokenizer, tmp_path) -> None:
    save_pretrained(model, tmp_path)
    tokenizer.save(tmp_path)
    llm = LLM(tmp_path, num_kv_blocks=64, block_size=8)
    texts = ["the quick brown", "a cat", "over the lazy dog while"]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=6))
    assert [o.prompt for o in outs] == texts
    for text, out in zip(texts, outs, strict=True):
        ids = tokenizer.encode(text)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == reference_greedy(model, ids, 6)
        assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special=True)
    # a stop string cuts the text where it starts (and is not included)
    full = outs[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = llm.generate(texts[0], SamplingParams(temperature=0.0, max_tokens=6, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == full[: full.index(stop)]


def test_abort_frees_blocks_at_once(model) -> None:
    engine = make_engine(model)
    keep, drop = (engine.add_request(p, GREEDY) for p in prompts(20, 40))
    engine.step()
    engine.step()
    used_before = engine.get_stats().kv_blocks_used
    out = engine.abort(drop)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.get_stats().kv_blocks_used == used_before - 5  # ceil(40 / 8) blocks, freed now
    assert engine.abort(drop) is None  # unknown now
    finished = run_to_completion(engine)
    assert set(finished) == {keep}


def test_n_samples_share_prompt_blocks(model) -> None:
    engine = make_engine(model, enable_prefix_caching=False)  # sharing works without it too
    prompt = prompts(37)[0]  # 4 full blocks of 8 + 5 tokens
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    request_id = engine.add_request(prompt, params)
    shared_seen = False
    finished = {}
    while engine.has_unfinished_requests():
        seqs = engine.requests[request_id].seqs if request_id in engine.requests else []
        tables = [s.block_table for s in seqs if s.block_table]
        if len(tables) == 3:
            shared_seen |= all(t[:4] == tables[0][:4] for t in tables)
            assert all(engine.block_manager.ref_counts[b] == 3 for b in tables[0][:4])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert shared_seen
    outs = finished[request_id].outputs
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different streams per sample
    again = LLM(make_engine(model)).generate([prompt], params)[0].outputs
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # seeded: reproducible
    greedy = LLM(make_engine(model)).generate([prompt], SamplingParams(n=2, temperature=0.0, max_tokens=5))
    assert [o.token_ids for o in greedy[0].outputs] == [reference_greedy(model, prompt, 5)] * 2


def test_finish_reasons_and_eos(model, tokenizer) -> None:
    engine = make_engine(model, tokenizer)
    eos = tokenizer.eos_id
    # EOS forced by a bias, held back for min_tokens: stops on the 3rd token, EOS included.
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=2, logit_bias={eos: 100.0})
    stop_id = engine.add_request(prompts(9)[0], params)
    length_id = engine.add_request(prompts(9)[0], SamplingParams(temperature=0.0, max_tokens=4))
    finished = run_to_completion(engine)
    stopped = finished[stop_id].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == eos and len(stopped.token_ids) == 3
    assert finished[length_id].outputs[0].finish_reason == "length"
    assert len(finished[length_id].outputs[0].token_ids) == 4
    # max_tokens=None runs to the context length
    engine = make_engine(model, max_model_len=40)
    request_id = engine.add_request(prompts(30)[0], SamplingParams(temperature=0.0, max_tokens=None))
    out = run_to_completion(engine)[request_id].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_bad_requests_get_clear_errors(model) -> None:
    engine = make_engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 320\)"):
        engine.add_request([1, 320], GREEDY)
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\).*max_model_len=64"):
        engine.add_request(list(range(60)), GREEDY)
    small_pool = make_engine(model, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small_pool.add_request(list(range(30)), GREEDY)  # 40 tokens > 4 blocks of 8: never fits
    engine.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already running"):
        engine.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(ValueError, match=r"unknown config key 'engine\.no_such_option'"):
        LLMEngine.from_pretrained("unused", no_such_option=1)


def test_preemption_recomputes_to_the_same_tokens(model) -> None:
    # 12 blocks of 8 = 96 slots for four 20-token prompts growing to 36: someone must be preempted.
    engine = make_engine(model, num_kv_blocks=12, max_num_batched_tokens=96)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    batch = prompts(20, 20, 20, 20, seed=3)
    ids = [engine.add_request(p, params) for p in batch]
    finished = run_to_completion(engine)
    assert engine.get_stats().num_preempted_total > 0
    for request_id, prompt in zip(ids, batch, strict=True):
        assert finished[request_id].outputs[0].token_ids == reference_greedy(model, prompt, 16)


def test_stats_count_tokens_per_expert(model) -> None:
    engine = make_engine(model)
    before = [sum(layer) for layer in engine.get_stats().tokens_per_expert]
    engine.add_request(prompts(25)[0], SamplingParams(temperature=0.0, max_tokens=4))
    run_to_completion(engine)
    after = [sum(layer) for layer in engine.get_stats().tokens_per_expert]
    # 25 prompt tokens + 3 decoded (the 4th sampled token is never fed back), top-2 routing
    assert [a - b for a, b in zip(after, before, strict=True)] == [2 * 28] * CFG.num_moe_layers


def test_prompt_and_sample_logprobs_match_a_full_forward(model) -> None:
    engine = make_engine(model, max_num_batched_tokens=16)  # the prompt spans several chunks
    prompt = prompts(40)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=1)
    request_id = engine.add_request(prompt, params)
    out = run_to_completion(engine)[request_id]
    with torch.no_grad():
        ids = prompt + out.outputs[0].token_ids
        logprobs_TV = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        assert out.prompt_logprobs[t][prompt[t]].logprob == pytest.approx(
            float(logprobs_TV[t - 1, prompt[t]]), abs=1e-5
        )
    for i, position in enumerate(out.outputs[0].logprobs):
        token = out.outputs[0].token_ids[i]
        assert position[token].rank == 1 and len(position) == 2  # greedy: the chosen one is the top one
        assert position[token].logprob == pytest.approx(
            float(logprobs_TV[len(prompt) - 1 + i, token]), abs=1e-5
        )


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_checkpoint_on_cpu_without_half_matmul_is_served_in_float32(
    model, half: torch.dtype, tmp_path, caplog
) -> None:
    checkpoint = copy.deepcopy(model).to(half)
    save_pretrained(checkpoint, tmp_path)
    plain_cpu = not hardware.native_bf16_matmul("cpu")  # no AMX / AVX512-BF16: PyTorch emulates it
    with caplog.at_level(logging.INFO, logger="moetron.infer"):
        engine = LLMEngine.from_pretrained(tmp_path, num_kv_blocks=64, block_size=8)
    name = str(half).removeprefix("torch.")
    assert engine.runner.dtype == (torch.float32 if plain_cpu else half)
    assert (f"serving the {name} checkpoint in float32" in caplog.text) == plain_cpu
    if plain_cpu:  # bf16 weights stay bf16 on the fused path (widened in the kernels); fp16 ones convert
        kept_bf16 = half == torch.bfloat16 and fused_layers.supports(engine.model)
        assert next(engine.model.parameters()).dtype == (half if kept_bf16 else torch.float32)
    # exact widening: the engine decodes what the checkpoint's values compute in float32
    reference = copy.deepcopy(checkpoint).float() if plain_cpu else checkpoint
    prompt = prompts(9)[0]
    engine.add_request(prompt, GREEDY)
    (out,) = run_to_completion(engine).values()
    assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 10)
    # a named dtype is kept
    kept = LLMEngine.from_pretrained(tmp_path, dtype=name, num_kv_blocks=64, block_size=8)
    assert next(kept.model.parameters()).dtype == half and kept.runner.dtype == half
