"""cl100k_base (GPT-4's tokenizer) rebuilt offline from quicktok-v1's ranks as a Hugging Face BPE:
the known ids, exact agreement with quicktok's own (tiktoken-exact) encoder, lossless round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moetron.data import DataError, Tokenizer, load_tokenizer, shakespeare

quicktok = pytest.importorskip("quicktok")

SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}  # fmt: skip
TEXTS = [
    "hello world",
    "tiktoken is great!",
    "I'm sure they'll say WE'D've 1234567 dollars, $3.50.\n\n\n  indented\tand\r\ncrlf",
    "Emoji 👩🏽‍💻🇫🇷🎭, CJK 漢字かな한국어, Arabic مرحبا, combining e\u0301, zero\u200bwidth, NBSP\u00a0x",
    "   trailing spaces   \n",
    "".join(chr(c) for c in range(0x20, 0x2FFF, 5)),
    "def f(x):\n    return x**2  # comment\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("cl100k_base")


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert tok.vocab_size == 100_277
    assert {t: tok.backend.token_to_id(t) for t in SPECIALS} == SPECIALS
    assert tok.eos_id == tok.bos_id == tok.pad_id == 100257
    assert tok.encode("a<|endoftext|>b") == [64, 100257, 65]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_quicktok_and_round_trips(tok: Tokenizer, text: str) -> None:
    reference = quicktok.get_encoding("cl100k_base")
    ids = tok.encode(text, allow_special=False)
    assert ids == reference.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_matches_quicktok_on_a_play(tok: Tokenizer) -> None:
    text = shakespeare.works()["hamlet_gut"]
    assert tok.encode_batch([text]) == [quicktok.get_encoding("cl100k_base").encode_ordinary(text)]


def test_special_text_is_plain_for_documents(tok: Tokenizer) -> None:
    reference = quicktok.get_encoding("cl100k_base")
    assert tok.encode("<|endoftext|>", allow_special=False) == reference.encode_ordinary("<|endoftext|>")


def test_transformers_loads_it(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok.save(tmp_path / "cl100k"))
    for text in [*TEXTS, "x<|endoftext|>y"]:
        assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == 100257


def test_missing_quicktok_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from moetron.data import cl100k

    monkeypatch.setitem(sys.modules, "quicktok", None)
    with pytest.raises(DataError, match=r"needs quicktok-v1: pip install 'moetron\[cl100k\]'"):
        cl100k._data_dir()
