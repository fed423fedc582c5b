"""GGUF export: llama.cpp loads what `export_gguf` writes and computes the same logits as moetron.

The parity test needs llama-cpp-python (the `bench` extra; not a CI dependency) and llama.cpp's
converter unpacked (`python -m moetron.convert.gguf fetch`); it is skipped, saying which is
missing, without them. The input checks run everywhere.

Tolerance: max |Δlogit| ≤ 1e-4 in float32, as for transformers (ggml and torch sum in different
orders; measured: 2e-7). llama.cpp's KV cache is set to f32: its f16 default alone costs ~1e-4.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from conftest import reference_greedy

from moetron.config import ModelConfig, MoEConfig
from moetron.convert.gguf import GGUFExportError, export_gguf, find_converter, write_sentencepiece_tokenizer
from moetron.convert.hf import save_pretrained
from moetron.data.shakespeare import works
from moetron.model import Transformer

ATOL = 1e-4
CFG = ModelConfig(
    vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=96),
)  # fmt: skip


def _random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer.from_config(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped or dropped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _converter_or_skip() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (benchmark-only: pip install -e '.[bench]')")
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("sentencepiece is not installed (benchmark-only: pip install -e '.[bench]')")
    try:
        find_converter()
    except GGUFExportError as e:
        pytest.skip(str(e))


def test_llama_cpp_logits_and_greedy_tokens_match_moetron(tmp_path) -> None:
    _converter_or_skip()
    import llama_cpp
    import sentencepiece

    model = _random_model(CFG)
    save_pretrained(model, tmp_path / "model")
    text = works()["hamlet_gut"][:100_000]
    write_sentencepiece_tokenizer([text], CFG.vocab_size, tmp_path / "model")
    gguf = export_gguf(tmp_path / "model", tmp_path / "model.gguf", outtype="f32")

    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "model" / "tokenizer.model"))
    prompt = spm.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind")
    assert 16 <= len(prompt) < 64 and max(prompt) < CFG.vocab_size
    llm = llama_cpp.Llama(
        str(gguf),
        n_ctx=CFG.max_seq_len,
        n_threads=1,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    assert llm.n_vocab() == CFG.vocab_size
    llm.eval(prompt)
    theirs = torch.from_numpy(llm.scores[: len(prompt)].copy())
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= ATOL

    # Greedy decoding through llama.cpp's own KV cache and sampler vs moetron's full recompute.
    llm.reset()
    theirs_ids = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        theirs_ids.append(token)
        if len(theirs_ids) == 12:
            break
    assert theirs_ids == reference_greedy(model, prompt, max_tokens=12)


def test_export_refuses_what_the_converter_cannot_take(tmp_path) -> None:
    with pytest.raises(GGUFExportError, match=r"no config\.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype='q4_k' must be one of"):
        export_gguf(tmp_path, tmp_path / "x.gguf", outtype="q4_k")

    save_pretrained(_random_model(CFG), tmp_path / "bpe")  # no tokenizer.model
    with pytest.raises(GGUFExportError, match=r"no SentencePiece tokenizer\.model"):
        export_gguf(tmp_path / "bpe", tmp_path / "x.gguf")

    shared = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, num_shared_experts=1))
    save_pretrained(_random_model(shared), tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["architectures"] != [
        "MixtralForCausalLM"
    ]
    with pytest.raises(GGUFExportError, match="has no GGUF mapping"):
        export_gguf(tmp_path / "shared", tmp_path / "x.gguf")

    with pytest.raises(GGUFExportError, match="fetch"):
        find_converter(tmp_path / "no-llama-cpp-here")
    assert not (tmp_path / "x.gguf").exists()
