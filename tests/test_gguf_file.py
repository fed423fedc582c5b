"""GGUF files by moetron's own writer and reader (moetron/convert/gguf_file.py, the `gguf` package):
a float file round-trips the model and tokenizer exactly; a quantized file holds the blocks moetron's
quantizer makes and serves exactly as `--quantization` does; the engine and the CLI take .gguf
paths; broken files and what a llama-architecture file cannot carry are refused by name. With
llama-cpp-python installed, llama.cpp runs the same files to the same logits (optional)."""

from __future__ import annotations

import copy
import importlib.util

import gguf
import numpy as np
import pytest
import torch

from moetron.cli import main
from moetron.config import ModelConfig, MoEConfig
from moetron.convert.gguf_file import GGUFError, load_gguf, write_gguf
from moetron.convert.hf import save_pretrained
from moetron.data.tokenizer import train_bpe
from moetron.infer.engine import LLMEngine
from moetron.infer.sampling_params import SamplingParams
from moetron.kernels import cpu_kernels
from moetron.model import Transformer
from moetron.quant import ggml_blocks
from moetron.quant.interleave import INTERLEAVED, from_r8
from moetron.quant.quantize import quantize_model, quantized_format

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="quantized serving runs on moetron's CPU kernels (AVX2, a compiler)"
)
# Multi-query attention with 8 heads (the rope permutation of q and k rows differs), widths that
# hold every format except Q4_K at the experts' 96 (which then fall back to Q8_0).
CFG = ModelConfig(
    vocab_size=320, dim=256, num_layers=2, num_heads=8, num_kv_heads=1, head_dim=32, max_seq_len=128,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=96, bias_update_rate=0.0),
)  # fmt: skip
TEXT = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 20
)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return Transformer.from_config(CFG).eval(), train_bpe([TEXT], 300)


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def test_float_file_round_trips_model_and_tokenizer(model_and_tokenizer, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    loaded, loaded_tokenizer = load_gguf(path)
    assert loaded.cfg.num_kv_heads == 1 and loaded.cfg.moe.num_experts == 4 and loaded.cfg.head_dim == 32
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), model(_ids()))
    for text in (TEXT[:80], "<|user|>\nhi<|end|>", "naïve 123456 \n\n x"):
        assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.eos_id == tokenizer.eos_id and loaded_tokenizer.bos_id == tokenizer.bos_id
    messages = [{"role": "user", "content": "Speak."}]
    assert loaded_tokenizer.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    # What llama.cpp reads: the llama architecture, a byte-level BPE with the Llama-3 split.
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    q_rows = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight"].data
    wq = model.layers[0].attention.wq.weight.detach()
    assert np.array_equal(q_rows[1], wq[16].numpy())  # GGML's interleaved RoPE pairs: row 1 is row d/2


@needs_kernels
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_k"])
def test_quantized_file_serves_as_quantization_at_load(model_and_tokenizer, tmp_path, outtype) -> None:
    model, tokenizer = model_and_tokenizer
    path = write_gguf(model, tokenizer, tmp_path / f"m-{outtype}.gguf", outtype)
    loaded, _ = load_gguf(path)
    # w2's width 96 is not Q4_K's 256: Q8_0 there; Q8_0/Q4_0 rows are kept interleaved (r8)
    expert_format = "q8_0_r8" if outtype == "q4_k" else INTERLEAVED.get(outtype, outtype)
    experts = loaded.layers[1].ffn.experts
    assert experts.weight_formats["w2"] == expert_format
    w1 = experts.w1.reshape(-1, experts.w1.shape[-1])
    if experts.weight_formats["w1"].endswith("_r8"):
        w1 = from_r8(w1, outtype)
    assert torch.equal(
        w1, ggml_blocks.quantize(model.layers[1].ffn.experts.w1.detach().reshape(-1, 256), outtype)
    )
    # The file's token embedding is quantized too (as llama.cpp's are); give the in-memory
    # quantization the same rows, then both must compute the same bits.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        embedding = reference.tok_embeddings.weight
        embedding.copy_(ggml_blocks.dequantize(ggml_blocks.quantize(embedding, outtype), outtype))
    quantize_model(reference, outtype)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), reference(_ids()))
    engine = LLMEngine.from_pretrained(path, num_kv_blocks=32, block_size=8)
    assert engine.runner.fused and quantized_format(engine.model) == outtype
    prompt = engine.tokenizer.encode("ROMEO: But soft")  # the tokenizer rebuilt from the file
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert len(finished[request].outputs[0].token_ids) == 6


def test_cli_export_then_serve_config(model_and_tokenizer, tmp_path, capsys) -> None:
    model, tokenizer = model_and_tokenizer
    save_pretrained(model, tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    out = tmp_path / "out.gguf"
    assert main(["export", "gguf", str(tmp_path / "hf"), str(out), "--outtype", "bf16"]) == 0
    assert "bf16" in capsys.readouterr().out
    loaded, _ = load_gguf(out)
    with torch.no_grad():
        expected = model.tok_embeddings.weight.bfloat16().float()
        assert torch.equal(loaded.tok_embeddings.weight, expected)
    assert not list(tmp_path.glob(".*.partial"))  # written beside and renamed


def test_what_llama_files_cannot_carry_is_refused(model_and_tokenizer, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    biased = copy.deepcopy(model)
    biased.layers[0].ffn.router.expert_bias[1] = 0.5
    with pytest.raises(GGUFError, match="nonzero router selection bias"):
        write_gguf(biased, tokenizer, tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match="outtype 'q5_1'"):
        write_gguf(model, tokenizer, tmp_path / "b.gguf", "q5_1")
    assert not (tmp_path / "b.gguf").exists()


def _rewrite(
    src, dst, *, arch: str = "llama", drop: str = "", retype: str = "", tokenizer_model: str = "gpt2"
):
    """A copy of GGUF `src` with one thing changed, through the gguf package's writer."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "tokenizer.ggml.model":
            value = tokenizer_model
        key = name.replace("llama.", f"{arch}.", 1)
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name == drop:
            continue
        raw_type = tensor.tensor_type
        data = np.asarray(tensor.data)
        if tensor.name == retype:  # same bytes per row as Q4_0, another type: Q5_0 has 22, use IQ4_NL's 18
            raw_type = gguf.GGMLQuantizationType.IQ4_NL
        writer.add_tensor(tensor.name, data, raw_dtype=raw_type)  # quantized data: uint8 [rows, bytes]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_broken_files_are_refused_by_name(model_and_tokenizer, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    good = write_gguf(model, tokenizer, tmp_path / "good.gguf", "q4_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GGUFError, match=r"truncated\.gguf: not a readable GGUF file"):
        load_gguf(truncated)
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    cases = {
        "arch": ({"arch": "qwen2"}, "architecture 'qwen2'; moetron serves 'llama'"),
        "missing": ({"drop": "blk.1.ffn_up_exps.weight"}, "tensor 'blk.1.ffn_up_exps.weight' is missing"),
        "type": ({"retype": "blk.0.attn_v.weight"}, "tensor 'blk.0.attn_v.weight' is IQ4_NL"),
        "tokenizer": ({"tokenizer_model": "bert"}, "tokenizer.ggml.model='bert'"),
    }
    for label, (change, message) in cases.items():
        path = _rewrite(good, tmp_path / f"{label}.gguf", **change)
        with pytest.raises(GGUFError, match=message):
            load_gguf(path)
    with pytest.raises(ValueError, match="holds q4_0 weights already"):
        LLMEngine.from_pretrained(good, quantization="q8_0")
    assert main(["serve", str(truncated), "--port", "1"]) != 0  # a clear error at start, no traceback


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the bench extra)"
)
@needs_kernels
def test_llama_cpp_runs_our_files_to_our_logits(model_and_tokenizer, tmp_path) -> None:
    """Teacher-forced logits of llama.cpp and moetron on the same file. With an fp32 KV cache,
    llama.cpp's Q8_0 path computes what ours does (Q8_0 activations, exact int8 block sums) up to
    the fp32 order of summing blocks; F32 differs by float summation order; Q4_0 by llama.cpp's
    repacked-weight path."""
    model, tokenizer = model_and_tokenizer
    ids = _ids()[0].tolist()
    tolerances = {"f32": 1e-3, "q8_0": 1e-5, "q4_0": 0.03}
    for outtype, tolerance in tolerances.items():
        path = write_gguf(model, tokenizer, tmp_path / f"l-{outtype}.gguf", outtype)
        ours, theirs = _both_logits(path, ids)
        error = float((ours - theirs).norm() / theirs.norm())
        assert error <= tolerance, (outtype, error)
        assert bool((ours.argmax(-1) == theirs.argmax(-1)).all()), outtype


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the bench extra)"
)
@needs_kernels
def test_we_serve_llama_cpp_quantized_files(tmp_path) -> None:
    """What users have: files llama.cpp's own quantizer writes. For an 8-expert MoE (Mixtral's
    count; the Q8_0 file is made from a 4-expert one) Q4_K_M mixes Q4_K, Q5_K (attention output), Q6_K (head, some down projections) and Q8_0
    (attention keys and values). Its
    Q8_0 file gives llama.cpp's logits within float rounding (the same integer block sums, summed
    per block in moetron, per lane in llama.cpp: 9e-8 relative measured); Q4_K_M within 5%, the
    same top-1 token at >= 90% of the positions of this random model's flat distributions.
    (Measured on this model: from the float computation on the same dequantized weights, moetron's
    logits are 1.1% away; llama.cpp's, through its repacked K-quant path, 3.6%.)"""
    import ctypes

    import llama_cpp

    ids = _ids()[0].tolist()
    cases = ((4, 7, 1e-6, {"F32", "Q8_0"}), (8, 15, 0.05, {"F32", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}))
    for num_experts, ftype, tolerance, kinds in cases:
        torch.manual_seed(0)
        moe = MoEConfig(num_experts=num_experts, top_k=2, expert_hidden_dim=256, bias_update_rate=0.0)
        model = Transformer.from_config(ModelConfig(**{**CFG.__dict__, "moe": moe})).eval()
        source = write_gguf(model, train_bpe([TEXT], 300), tmp_path / f"f32-{num_experts}.gguf", "f32")
        target = tmp_path / f"llama-{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert (
            llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
            == 0
        )
        assert {t.tensor_type.name for t in gguf.GGUFReader(str(target)).tensors} == kinds
        ours, theirs = _both_logits(target, ids)
        assert float((ours - theirs).norm() / theirs.norm()) <= tolerance, ftype
        agreement = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
        assert agreement >= (1.0 if ftype == 7 else 0.9), (ftype, agreement)


def test_sentencepiece_vocabularies_encode_as_sentencepiece_does(tmp_path) -> None:
    """A `llama` (SentencePiece BPE) vocabulary, the kind Llama 2 / Mistral / Mixtral files carry,
    rebuilt from the file's pieces, scores and types: the same ids as SentencePiece itself on held-out
    Shakespeare lines and on odd text (leading and doubled spaces, accents, CJK by byte fallback)."""
    import io

    import sentencepiece

    from moetron.convert.gguf_file import _Fields, read_tokenizer
    from moetron.data.shakespeare import documents

    texts = documents()
    lines = [line for text in texts[:200] for line in text.splitlines() if line.strip()]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=1000,
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's tokenizer.model
    )  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(sp.GetPieceSize())
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.IdToPiece(i) for i in ids])
    writer.add_token_scores([sp.GetScore(i) for i in ids])
    kinds = gguf.TokenType
    writer.add_token_types([
        kinds.UNKNOWN if sp.IsUnknown(i) else kinds.CONTROL if sp.IsControl(i) else kinds.BYTE if sp.IsByte(i) else kinds.NORMAL
        for i in ids
    ])  # fmt: skip
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = read_tokenizer(_Fields(gguf.GGUFReader(str(tmp_path / "spm.gguf")), tmp_path / "spm.gguf"))
    held_out = [line for text in texts[200:240] for line in text.splitlines()[:20]]
    odd = ["   How should I your true love know", "  two  spaces", "héllo wörld ™ 日本", "tab\there", ""]
    for line in held_out + odd:
        ours = tokenizer.encode(line, allow_special=False)
        assert ours == sp.encode(line), line
        assert tokenizer.decode(ours) == line
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    # Structured outputs read this vocabulary as we do: pieces with "▁", byte fallback for CJK.
    from moetron.infer.sampling_params import StructuredOutputs
    from moetron.infer.structured_output import GrammarCompiler, mask_bias

    schema = '{"type":"object","properties":{"line":{"type":"string"}},"required":["line"]}'
    state = GrammarCompiler(tokenizer, sp.GetPieceSize()).state(StructuredOutputs(json=schema))
    document = '{"line":"How should I your true love know, héllo 日本"}'
    generated = tokenizer.encode(document, allow_special=False)[1:]  # as sampled: no dummy-prefix "▁"
    assert tokenizer.decode(generated) == document
    for token in generated:
        assert mask_bias([state], sp.GetPieceSize())[0, token] == 0 and state.accept(token)
    assert state.is_finished


def _both_logits(path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of moetron and of llama.cpp (fp32 KV cache, like ours) on one file."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, type_k=f32, type_v=f32)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    loaded, _ = load_gguf(path)
    with torch.no_grad():
        return loaded(torch.tensor([ids]))[0], theirs
