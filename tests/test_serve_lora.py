"""LoRA adapters served per request (infer/adapters.py): a request with an adapter gives the same
bits alone or in a step shared with the base model and other adapters (batch invariance across
adapters), its logprobs are within 1e-4 of the merged model's, the prefix cache keeps adapters
apart, the server lists adapters and routes by `model`, bad adapters are refused at start."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_openai_error

from moetron.config import LoRAConfig
from moetron.convert.hf import from_pretrained, save_pretrained
from moetron.data.tokenizer import load_tokenizer
from moetron.finetune.lora import apply_lora, lora_parameters, merge_lora
from moetron.finetune.peft_format import save_adapter
from moetron.infer.adapters import AdapterLoadError
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams

LOGPROB_ATOL = 1e-4  # merged weights round differently from base + update


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two trained-looking adapters (random non-zero B) and the model merged with the first."""
    root = tmp_path_factory.mktemp("served-adapters")
    for index, targets in enumerate((["attention", "experts", "router"], ["attention"])):
        model = from_pretrained(tiny_model_dir)
        cfg = LoRAConfig(rank=4, targets=targets)
        apply_lora(model, cfg)
        gen = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, param in lora_parameters(model):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        save_adapter(model, cfg, root / f"adapter{index}")
        if index == 0:
            merge_lora(model)
            save_pretrained(model, root / "merged")
            load_tokenizer(tiny_model_dir).save(root / "merged")
    return root


def _engine(tiny_model_dir, adapters, **settings) -> LLMEngine:
    modules = [f"first={adapters / 'adapter0'}", f"second={adapters / 'adapter1'}"]
    return LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, lora_modules=modules, **settings)


def _run(engine: LLMEngine, requests: list[tuple[list[int], str | None, SamplingParams]]) -> list:
    ids = [engine.add_request(p, params, lora=lora) for p, lora, params in requests]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, seed=4, logprobs=1, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def test_an_adapter_request_is_the_same_alone_or_beside_others(tiny_model_dir, adapters) -> None:
    engine = _engine(tiny_model_dir, adapters, max_num_batched_tokens=24)  # chunked prefills too
    for params in (GREEDY, SEEDED):
        [alone] = _run(engine, [(PROMPT, "first", params)])
        mixed = _run(
            engine,
            [([1, 2, 3] * 9, None, GREEDY), ([4, 4, 9], "second", SEEDED), (PROMPT, "first", params),
             (PROMPT[:11], "first", GREEDY), ([7] * 20, "second", GREEDY)],
        )  # fmt: skip
        assert mixed[2].outputs[0].token_ids == alone.outputs[0].token_ids
        assert mixed[2].outputs[0].logprobs == alone.outputs[0].logprobs  # the same floats


def test_logprobs_match_the_merged_model(tiny_model_dir, adapters) -> None:
    [served] = _run(_engine(tiny_model_dir, adapters), [(PROMPT, "first", GREEDY)])
    [merged] = _run(
        LLMEngine.from_pretrained(adapters / "merged", num_kv_blocks=64), [(PROMPT, None, GREEDY)]
    )
    assert served.outputs[0].token_ids == merged.outputs[0].token_ids
    for ours, theirs in zip(served.outputs[0].logprobs, merged.outputs[0].logprobs, strict=True):
        for token, lp in theirs.items():
            assert abs(ours[token].logprob - lp.logprob) <= LOGPROB_ATOL
    [base] = _run(LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64), [(PROMPT, None, GREEDY)])
    assert base.outputs[0].token_ids != served.outputs[0].token_ids  # the adapter matters here


def test_the_prefix_cache_keeps_adapters_apart(tiny_model_dir, adapters) -> None:
    fresh = _engine(tiny_model_dir, adapters)
    [expected] = _run(fresh, [(PROMPT, "first", GREEDY)])
    engine = _engine(tiny_model_dir, adapters)
    _run(engine, [(PROMPT, None, GREEDY)])  # the base model's blocks of this prompt are cached
    [got] = _run(engine, [(PROMPT, "first", GREEDY)])
    assert got.num_cached_tokens == 0 and got.outputs[0].logprobs == expected.outputs[0].logprobs
    [again] = _run(engine, [(PROMPT, "first", GREEDY)])  # its own blocks, now cached, are reused
    assert again.num_cached_tokens > 0 and again.outputs[0].logprobs == expected.outputs[0].logprobs


def test_the_server_lists_adapters_and_routes_by_model(
    tiny_model_dir, adapters, serve_in_process, tokenizer
) -> None:
    engine = _engine(tiny_model_dir, adapters)
    [expected] = _run(_engine(tiny_model_dir, adapters), [(tokenizer.encode("ROMEO:"), "first", GREEDY)])
    with serve_in_process(engine, model_name="tiny") as srv:
        models = srv.client.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [
            ("tiny", None),
            ("first", "tiny"),
            ("second", "tiny"),
        ]
        body = {"model": "first", "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = srv.client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == "first"
        assert r.json()["choices"][0]["text"] == expected.outputs[0].text
        r = srv.client.post("/v1/completions", json=body | {"model": "third"})
        assert "`first`" in assert_openai_error(r, 404, param="model")["message"]


def test_bad_adapters_are_refused_at_start(tiny_model_dir, adapters, tmp_path) -> None:
    with pytest.raises(AdapterLoadError, match="expected NAME=ADAPTER_DIR"):
        LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, lora_modules=["first"])
    with pytest.raises(AdapterLoadError, match=r"broken=.*no adapter_config.json"):
        LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, lora_modules=[f"broken={tmp_path}"])
    other = dataclasses.replace(from_pretrained(tiny_model_dir).cfg, dim=96)
    from moetron.model.transformer import Transformer

    model = Transformer.from_config(other)
    apply_lora(model, LoRAConfig(rank=4, targets=["attention"]))
    save_adapter(model, LoRAConfig(rank=4, targets=["attention"]), tmp_path / "wrong")
    with pytest.raises(AdapterLoadError, match=r"wrong=.*this base model needs"):
        LLMEngine.from_pretrained(
            tiny_model_dir, num_kv_blocks=64, lora_modules=[f"wrong={tmp_path / 'wrong'}"]
        )
    with pytest.raises(ValueError, match="unknown LoRA adapter 'third'"):
        _engine(tiny_model_dir, adapters).add_request([1, 2, 3], GREEDY, lora="third")


def test_serve_flags_reach_the_engine_config(adapters) -> None:
    from moetron.cli import build_parser, serve_engine_config

    args, extra = build_parser().parse_known_args(
        ["serve", "DIR", "--lora-modules", f"first={adapters / 'adapter0'}", "b=/x y", "--max-loras", "3"]
    )
    cfg = serve_engine_config(args, [o for o in extra if o.startswith("--")])
    assert cfg.lora_modules == [f"first={adapters / 'adapter0'}", "b=/x y"] and cfg.max_loras == 3
