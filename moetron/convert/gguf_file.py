"""GGUF files, written and read by moetron itself (the `gguf` package; no llama.cpp at run time).

    moetron export gguf MODEL_DIR OUT.gguf --outtype f32|bf16|q8_0|q4_0|q4_k
    moetron serve FILE.gguf            LLM("FILE.gguf")

The layout is what llama.cpp's converter writes for a Mixtral (architecture "llama"): the same
tensor names, shapes and metadata keys, the query and key rows permuted into GGML's RoPE order
(pairs interleaved; moetron, like Hugging Face, rotates halves). So llama.cpp runs moetron's files,
and moetron serves llama.cpp's: matmul weights in Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K (the mix of a
Q4_K_M file) are installed as they lie in
the file (moetron/quant/quantize.py's quantized modules), F32/F16/BF16 ones widened to float32;
the embedding is dequantized (its rows are gathered, not multiplied).

The writer quantizes like `--quantization` (moetron/quant): norms and routers stay F32, the head
takes Q8_0 under the 4-bit types, a weight whose width is not whole blocks takes the next wider
type. Files are written beside the target and renamed: a crash never leaves a half-written file.

Tokenizer: moetron's byte-level BPE splits text with GPT-4's pattern, which is Llama 3's too, so
the file says `tokenizer.ggml.model = gpt2`, `tokenizer.ggml.pre = llama-bpe` (what llama.cpp's
converter could not tell from its hash table of known tokenizers) with the vocabulary, merges,
special tokens and chat template. Reading rebuilds that tokenizer from the same keys, and also
SentencePiece BPE (`llama`: what Llama 2, Mistral and Mixtral files carry) from its pieces and
scores; other kinds (other pre-tokenizers, unigram) are refused by name.

What a llama-architecture file cannot carry is refused at export: a router selection bias (llama.cpp's
Mixtral graph has none), shared experts, a mix of dense and MoE layers, unnormalised top-k weights,
RoPE scaling. Any unreadable or inconsistent file is a GGUFError naming the file and the key or tensor.

Legend: V vocabulary, D width, E experts, I expert width, H heads, G kv heads, d head_dim.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moetron.config import ModelConfig, MoEConfig, RopeConfig
from moetron.data.tokenizer import Tokenizer
from moetron.model.moe import GroupedExperts, MoELayer
from moetron.model.ops import Linear
from moetron.model.transformer import Transformer
from moetron.quant import ggml_blocks
from moetron.quant.quantize import HEAD_FORMAT, pack, set_quantized_weight, usable_format

ARCH = "llama"
# GGUF tensor types moetron reads, by ggml type id → its name in moetron/quant (floats: None).
READABLE = {0: None, 1: None, 30: None, 8: "q8_0", 2: "q4_0", 12: "q4_k", 13: "q5_k", 14: "q6_k"}
OUTTYPES = ("f32", "bf16", "q8_0", "q4_0", "q4_k")
# llama.cpp's pre-tokenizer names for GPT-4's split pattern (moetron's byte-level BPE).
GPT4_SPLIT_PRES = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")


class GGUFError(ValueError):
    """A GGUF file moetron cannot write or read, with the file and the key or tensor named."""


# --- names ---------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.router.gate.weight": "ffn_gate_inp.weight",
    "ffn.experts.w1": "ffn_gate_exps.weight",
    "ffn.experts.w2": "ffn_down_exps.weight",
    "ffn.experts.w3": "ffn_up_exps.weight",
    "ffn.w1.weight": "ffn_gate.weight",
    "ffn.w2.weight": "ffn_down.weight",
    "ffn.w3.weight": "ffn_up.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}  # fmt: skip
_FLOAT_ONLY = re.compile(r"(norm\.weight|ffn_gate_inp\.weight)$")  # norms and routers stay F32


def gguf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFError(f"moetron tensor {name!r} has no GGUF name")
    return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _rope_rows(weight: torch.Tensor, num_heads: int, to_gguf: bool) -> torch.Tensor:
    """Rows of a query/key projection between rotate-half order (moetron, HF) and GGML's
    interleaved pairs (llama.cpp's converter's `permute`). Whole rows move, so quantized rows do too."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    if to_gguf:
        return weight.reshape(num_heads, 2, half, -1).transpose(1, 2).reshape(rows, -1)
    return weight.reshape(num_heads, half, 2, -1).transpose(1, 2).reshape(rows, -1)


# --- writing -------------------------------------------------------------------------------------


def _check_exportable(model: Transformer) -> None:
    cfg = model.cfg
    moe_layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoELayer)]
    problems = []
    if moe_layers and len(moe_layers) != cfg.num_layers:
        problems.append("a mix of dense and MoE layers (moe.num_dense_layers > 0)")
    if moe_layers and cfg.moe.num_shared_experts:
        problems.append("shared experts")
    if moe_layers and not cfg.moe.normalize_top_k:
        problems.append("unnormalised top-k weights (moe.normalize_top_k=false)")
    if any(bool(layer.router.expert_bias.any()) for layer in moe_layers):
        problems.append("a nonzero router selection bias (llama.cpp's Mixtral graph has no such tensor)")
    if cfg.rope.scaling != "none":
        problems.append(f"RoPE scaling {cfg.rope.scaling!r}")
    if problems:
        raise GGUFError("a llama-architecture GGUF cannot carry " + "; ".join(problems))


def _tensor_type(name: str, outtype: str, width: int) -> str:
    if _FLOAT_ONLY.search(name):
        return "f32"
    fmt = HEAD_FORMAT[outtype] if name == "output.weight" and outtype in HEAD_FORMAT else outtype
    return usable_format(fmt, width)


def _gguf_array(weight: torch.Tensor, fmt: str) -> tuple[np.ndarray, object]:
    """The array GGUFWriter stores and its raw ggml type (None: float32 as is)."""
    from gguf import GGMLQuantizationType

    weight = weight.detach().float().contiguous()
    if fmt == "f32":
        return weight.numpy(), None
    if fmt == "bf16":
        return weight.bfloat16().view(torch.uint16).numpy(), GGMLQuantizationType.BF16
    return pack(weight, fmt).numpy(), GGMLQuantizationType[fmt.upper()]


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, outtype: str = "f32") -> Path:
    """`model` (float weights) and `tokenizer` as a GGUF file of `outtype` at `path`."""
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    _check_exportable(model)
    cfg = model.cfg
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_name(path.stem)
    writer.add_file_type(
        {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k": 14}[outtype]
    )  # LlamaFileType: ALL_F32, MOSTLY_BF16, MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_K_S
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if isinstance(model.layers[0].ffn, MoELayer):
        writer.add_feed_forward_length(cfg.moe.expert_hidden_dim)
        writer.add_expert_count(cfg.moe.num_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
    else:
        writer.add_feed_forward_length(cfg.moe.dense_hidden_dim)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    for name, weight in _export_tensors(model):
        fmt = _tensor_type(name, outtype, weight.shape[-1])
        array, raw_type = _gguf_array(weight, fmt)
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _export_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = model.cfg
    for name, tensor in model.named_parameters(remove_duplicate=False):
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd as the head when output.weight is absent
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise GGUFError(f"{name} is {tensor.dtype}: export a float model (not one quantized for serving)")
        if name.endswith("attention.wq.weight"):
            tensor = _rope_rows(tensor.detach(), cfg.num_heads, to_gguf=True)
        elif name.endswith("attention.wk.weight"):
            tensor = _rope_rows(tensor.detach(), cfg.num_kv_heads, to_gguf=True)
        yield gguf_name(name), tensor


def _tokenizer_json(tokenizer: Tokenizer) -> dict:
    return json.loads(tokenizer.backend.to_str())


def _add_tokenizer(writer: object, tokenizer: Tokenizer, vocab_size: int) -> None:
    import gguf
    from tokenizers import models

    from moetron.data.byte_level import byte_level_tokenizer

    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    ours = json.loads(byte_level_tokenizer(models.BPE()).to_str())["pre_tokenizer"]
    if model.get("type") != "BPE" or spec.get("pre_tokenizer") != ours:
        raise GGUFError(
            "GGUF export writes moetron's byte-level BPE (GPT-4's split pattern); this tokenizer is "
            f"{model.get('type')} with another pre-tokenizer"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())}, the model {vocab_size} rows")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id] = token
        types[token_id] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


# --- reading -------------------------------------------------------------------------------------


class _Fields:
    """The file's metadata, each missing or ill-typed key an error naming it."""

    def __init__(self, reader: object, path: Path) -> None:
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: object = ...) -> object:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # a malformed field
            raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read ({e})") from None


def _model_config(meta: _Fields) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{meta.path}: architecture {arch!r}; moetron serves {ARCH!r} (Mixtral, Llama) files")
    dim, num_heads = int(meta.get(f"{ARCH}.embedding_length")), int(meta.get(f"{ARCH}.attention.head_count"))
    head_dim = int(meta.get(f"{ARCH}.attention.key_length", dim // num_heads))
    rope_dims = int(meta.get(f"{ARCH}.rope.dimension_count", head_dim))
    if rope_dims != head_dim or int(meta.get(f"{ARCH}.attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{meta.path}: partial RoPE or value width != key width is not supported")
    if meta.get(f"{ARCH}.rope.scaling.type", "none") not in ("none",):
        raise GGUFError(f"{meta.path}: metadata key '{ARCH}.rope.scaling.type': only unscaled RoPE is served")
    num_layers = int(meta.get(f"{ARCH}.block_count"))
    hidden = int(meta.get(f"{ARCH}.feed_forward_length"))
    num_experts = int(meta.get(f"{ARCH}.expert_count", 0))
    moe = (
        MoEConfig(num_experts=num_experts, top_k=int(meta.get(f"{ARCH}.expert_used_count")), expert_hidden_dim=hidden)
        if num_experts
        else MoEConfig(num_experts=1, top_k=1, expert_hidden_dim=hidden, num_dense_layers=num_layers, dense_hidden_dim=hidden)
    )  # fmt: skip
    tokens = meta.get("tokenizer.ggml.tokens", None)
    vocab_size = int(meta.get(f"{ARCH}.vocab_size", len(tokens) if tokens else 0))
    try:
        return ModelConfig(
            vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{ARCH}.attention.head_count_kv", num_heads)), head_dim=head_dim,
            max_seq_len=int(meta.get(f"{ARCH}.context_length")),
            norm_eps=float(meta.get(f"{ARCH}.attention.layer_norm_rms_epsilon")),
            rope=RopeConfig(theta=float(meta.get(f"{ARCH}.rope.freq_base", 10_000.0))), moe=moe,
        )  # fmt: skip
    except ValueError as e:
        raise GGUFError(f"{meta.path}: its metadata make no valid model: {e}") from None


def read_tokenizer(meta: _Fields) -> Tokenizer:
    """The tokenizer the file's metadata describe: byte-level BPE with GPT-4's split (moetron's,
    Llama 3's) or SentencePiece BPE (`llama`: Llama 2, Mistral, Mixtral), with its special tokens,
    BOS/EOS and chat template."""
    from moetron.data.tokenizer import CHAT_TEMPLATE

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(
            f"{meta.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2" and pre in GPT4_SPLIT_PRES:
        backend = _byte_level_backend(meta, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_backend(meta, tokens, types)
    else:
        raise GGUFError(
            f"{meta.path}: tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}: moetron rebuilds "
            f"SentencePiece ('llama') and byte-level BPE tokenizers with GPT-4's split "
            f"({', '.join(GPT4_SPLIT_PRES)})"
        )
    _add_special_tokens(meta, backend, tokens, types)

    def token(key: str) -> str:
        token_id = int(meta.get(key))
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{meta.path}: {key}={token_id} is outside the vocabulary")
        return tokens[token_id]

    eos = token("tokenizer.ggml.eos_token_id")
    bos = token("tokenizer.ggml.bos_token_id") if "tokenizer.ggml.bos_token_id" in meta.fields else eos
    pad = (
        token("tokenizer.ggml.padding_token_id") if "tokenizer.ggml.padding_token_id" in meta.fields else eos
    )
    template = meta.get("tokenizer.chat_template", CHAT_TEMPLATE)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template)


CONTROL, UNUSED, BYTE = 3, 5, 6  # llama.cpp's token types (gguf.TokenType)


def _byte_level_backend(meta: _Fields, tokens: list[str], types: list[int]) -> object:
    from tokenizers import models

    from moetron.data.byte_level import byte_level_tokenizer

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != UNUSED}
    try:
        return byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    except Exception as e:  # tokenizers raises a bare Exception for inconsistent merges
        raise GGUFError(
            f"{meta.path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})"
        ) from None


def _sentencepiece_backend(meta: _Fields, tokens: list[str], types: list[int]) -> object:
    """SentencePiece BPE as llama.cpp's `llama` vocabulary runs it: "▁" for spaces, one prepended
    to the text, pieces merged by score, bytes outside the vocabulary as <0xXX> tokens."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise GGUFError(
            f"{meta.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((t for t, kind in zip(tokens, types, strict=True) if kind == 2), None)
    try:
        backend = tokenizers.Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges_by_score(tokens, scores, types),
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
    except Exception as e:
        raise GGUFError(
            f"{meta.path}: tokenizer.ggml.tokens do not make a SentencePiece vocabulary ({e})"
        ) from None
    # Always one "▁" before the text, as llama.cpp (and SentencePiece's dummy prefix) add it, also
    # before leading spaces (tokenizers' Metaspace skips it there).
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: piece a + b merges when a, b and ab are all ordinary
    pieces, the higher ab's score the earlier (ties: the shorter left part first)."""
    ordinary = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == 1}
    candidates = []
    for piece, index in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                candidates.append((-scores[index], cut, ordinary[left], ordinary[right], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _add_special_tokens(meta: _Fields, backend: object, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    for token_id, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != CONTROL:
            continue
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if backend.token_to_id(token) != token_id:
            raise GGUFError(f"{meta.path}: special token {token!r} is not at id {token_id} once rebuilt")


def load_gguf(path: str | Path) -> tuple[Transformer, Tokenizer]:
    """The model (float32 where the file is float, quantized modules where it holds Q8_0/Q4_0/Q4_K)
    and the tokenizer of a GGUF file; every problem a GGUFError at load, naming what is wrong."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or not GGUF: numpy/struct/value errors from the parser
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = _Fields(reader, path)
    cfg = _model_config(meta)
    tokenizer = read_tokenizer(meta)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.float()
    for layer in model.layers:
        if isinstance(layer.ffn, MoELayer):
            layer.ffn.router.expert_bias.zero_()
            layer.ffn.tokens_per_expert.zero_()
    tensors = {t.name: t for t in reader.tensors}
    names = dict(model.named_parameters(remove_duplicate=False))
    if "output.weight" not in tensors:  # llama.cpp ties the head to the embedding then
        model.output.weight = model.tok_embeddings.weight
        names.pop("output.weight")
    formats: dict[str, int] = {}
    for name in names:
        key = gguf_name(name)
        if key not in tensors:
            raise GGUFError(f"{path}: tensor {key!r} is missing (a {cfg.num_layers}-layer model needs it)")
        fmt = _install(model, name, tensors.pop(key), cfg, path)
        formats[fmt] = formats.get(fmt, 0) + 1
    if tensors:
        raise GGUFError(f"{path}: tensors moetron does not know: {sorted(tensors)[:5]}")
    quantized = [f for f in formats if f in READABLE.values()]  # the block formats (floats map to None)
    if quantized:  # the dominant quantized type: the engine then does not quantize again
        model.__dict__["quantization"] = max(quantized, key=lambda f: formats[f])
    model.name_or_path = path.stem
    return model.eval(), tokenizer


_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _install(model: Transformer, name: str, tensor: object, cfg: ModelConfig, path: Path) -> str:
    """Put one GGUF tensor into `model` as parameter `name`; returns its format name."""
    type_id = int(tensor.tensor_type)
    if type_id not in READABLE:
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} is {tensor.tensor_type.name}; moetron reads "
            "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K"
        )
    fmt = READABLE[type_id] or {0: "f32", 1: "f16", 30: "bf16"}[type_id]
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    target = getattr(module, attr)
    # GGUF lists dimensions innermost first; rows of raw bytes, then typed.
    rows = tuple(int(n) for n in reversed(tensor.shape[1:]))
    try:
        raw = torch.from_numpy(np.ascontiguousarray(tensor.data).view(np.uint8).reshape(*rows, -1).copy())
    except ValueError as e:
        raise GGUFError(f"{path}: tensor {tensor.name!r}: its data do not fit its shape ({e})") from None
    if rows != tuple(target.shape[:-1]):
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} has {rows} rows; the model wants {tuple(target.shape)}"
        )
    width = target.shape[-1]
    row_bytes = (
        width * _FLOAT_DTYPES[fmt].itemsize if fmt in _FLOAT_DTYPES else ggml_blocks.row_bytes(fmt, width)
    )
    if raw.shape[-1] != row_bytes:
        raise GGUFError(
            f"{path}: tensor {tensor.name!r}: rows of {raw.shape[-1]} bytes are not {fmt} rows of {width}"
        )
    if name.endswith("attention.wq.weight"):
        raw = _rope_rows(raw, cfg.num_heads, to_gguf=False)
    elif name.endswith("attention.wk.weight"):
        raw = _rope_rows(raw, cfg.num_kv_heads, to_gguf=False)
    matmul = isinstance(module, GroupedExperts) or (
        type(module) is Linear and not module_name.endswith("router.gate")
    )
    if fmt in _FLOAT_DTYPES or not matmul:
        if fmt in _FLOAT_DTYPES:
            values = raw.view(_FLOAT_DTYPES[fmt]).float()
        else:  # an embedding, norm or router stored quantized: dequantized
            values = ggml_blocks.dequantize(raw.reshape(-1, raw.shape[-1]), fmt).reshape(target.shape)
        with torch.no_grad():
            target.copy_(values)
        return fmt
    set_quantized_weight(module, attr, raw.contiguous(), fmt)
    return fmt
