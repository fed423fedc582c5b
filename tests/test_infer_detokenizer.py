"""Incremental detokenization (never half a character; deltas add up to decode(output)), stop
conditions, and the streaming hold-back for partial stop strings."""

from __future__ import annotations

import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moetron.data.tokenizer import Tokenizer, train_bpe
from moetron.infer.detokenizer import IncrementalDetokenizer, StopChecker, safe_text_length
from moetron.infer.sampling_params import SamplingParams

MIXED = [
    "Hello world, the quick brown fox jumps over the lazy dog. 🦊🐶 Done!",
    "日本語のテキストと中文文本混在。 Emoji: 😀😃😄😁 and 👨‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵.",
    "Ünïcödé àccénts, Ελληνικά, русский текст, עברית, العربية, हिन्दी.",
    "Numbers 12345 and symbols ∑∫√∞ ≠ ≤ ≥ → ← ↑ ↓ ★ ☆ ♠ ♣.",
] * 3
ASCII = ["the cat sat on the mat; the dog sat on the log. " * 5, "hello world, again and again. " * 5]


@pytest.fixture(scope="module")
def mixed_tok() -> Tokenizer:
    """Merges inside multi-byte characters and across them: tokens that split characters."""
    return train_bpe(MIXED, vocab_size=520)


@pytest.fixture(scope="module")
def ascii_tok() -> Tokenizer:
    """Trained on ASCII only, so every non-ASCII character is spelled byte by byte."""
    return train_bpe(ASCII, vocab_size=300)


@pytest.fixture(scope="module")
def hf_byte_level() -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE built with Hugging Face `tokenizers` directly."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(MIXED, trainer)
    return tok


def _stream(tokenizer, prompt: list[int], output: list[int], skip_special: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special)
    deltas = [detok.add(t) for t in output]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _decode(tokenizer, ids: list[int], skip_special: bool = True) -> str:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.decode(ids, skip_special=skip_special)
    return tokenizer.decode(ids, skip_special_tokens=skip_special)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text) if isinstance(tokenizer, Tokenizer) else tokenizer.encode(text).ids


@pytest.mark.parametrize("which", ["mixed_tok", "ascii_tok", "hf_byte_level"])
def test_emoji_and_cjk_stream_whole_characters(which: str, request) -> None:
    tokenizer = request.getfixturevalue(which)
    prompt = _encode(tokenizer, "Q: say something ")
    for text in MIXED[:4]:
        output = _encode(tokenizer, text)
        deltas = _stream(tokenizer, prompt, output)
        assert "".join(deltas) == _decode(tokenizer, output)
        # every prefix sent so far is a prefix of the final text: no U+FFFD ever went out
        assert all("\ufffd" not in d for d in deltas)
        assert deltas[-1] == ""  # nothing left to flush
    # the ASCII-trained tokenizer really does split characters across tokens
    if which == "ascii_tok":
        assert len(_encode(tokenizer, "😀")) == 4


@pytest.mark.parametrize("which", ["mixed_tok", "ascii_tok", "hf_byte_level"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_random_token_sequences_add_up_to_decode(which: str, skip_special: bool, request) -> None:
    """Random ids (invalid UTF-8, special tokens, split characters): the deltas plus flush() equal
    decode(output), and decode(prompt + output) = decode(prompt) + the stream."""
    tokenizer = request.getfixturevalue(which)
    vocab = tokenizer.vocab_size if isinstance(tokenizer, Tokenizer) else tokenizer.get_vocab_size()
    rng = random.Random(which)
    for trial in range(30):
        prompt = _encode(tokenizer, MIXED[trial % 4][: rng.randrange(1, 40)])
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        deltas = _stream(tokenizer, prompt, output, skip_special)
        assert "".join(deltas) == _decode(tokenizer, output, skip_special), (prompt, output)


def test_prompt_ending_mid_character(ascii_tok: Tokenizer) -> None:
    emoji = _encode(ascii_tok, "😀🦊")
    prompt, output = _encode(ascii_tok, "hi ") + emoji[:2], emoji[2:]
    deltas = _stream(ascii_tok, prompt, output)
    assert "".join(deltas) == ascii_tok.decode(output)


def test_transformers_tokenizer(hf_byte_level: tokenizers.Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=hf_byte_level, eos_token="<|endoftext|>")
    output = [*hf_byte_level.encode(MIXED[1]).ids, tokenizer.eos_token_id]
    deltas = _stream(tokenizer, [], output)
    assert (
        "".join(deltas) == tokenizer.decode(output, skip_special_tokens=True) == " " + MIXED[1]
    )  # add_prefix_space


def test_decodes_a_small_window(ascii_tok: Tokenizer) -> None:
    """O(1) per token: each step decodes a few recent tokens, never the whole output."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return ascii_tok.decode(ids, skip_special=skip_special_tokens)

    output = _encode(ascii_tok, "the cat 😀 sat 日本 " * 100)
    deltas = _stream(Counting(), [], output)
    assert "".join(deltas) == ascii_tok.decode(output)
    assert len(output) > 1000 and max(lengths) <= 8


def test_stop_checker_eos_and_stop_ids() -> None:
    eos = 3
    check = StopChecker(SamplingParams(stop_token_ids=[7], max_tokens=10), eos).check
    assert check([5], "a") == (None, None, "a")
    assert check([5, eos], "a") == ("stop", None, "a")
    assert check([5, 7], "a") == ("stop", 7, "a")
    ignore = StopChecker(SamplingParams(ignore_eos=True, max_tokens=10), eos)
    assert ignore.check([5, eos], "a") == (None, None, "a")
    assert ignore.check([5, eos] * 5, "a") == ("length", None, "a")
    # nothing stops before min_tokens
    early = StopChecker(SamplingParams(min_tokens=3, stop_token_ids=[7], max_tokens=10), eos)
    assert early.check([eos], "") == (None, None, "")
    assert early.check([eos, 7], "") == (None, None, "")
    assert early.check([eos, 7, 7], "") == ("stop", 7, "")


def test_stop_strings() -> None:
    params = SamplingParams(stop=["STOP", "\n\n"], max_tokens=100)
    checker = StopChecker(params, eos_token_id=None)
    ids: list[int] = []
    text = ""
    result = None
    for piece in ["Hello", " wor", "ld ST", "O", "P and more"]:  # the stop string spans tokens
        ids.append(len(ids))
        text += piece
        result = checker.check(ids, text)
        if result[0]:
            break
    assert result == ("stop", "STOP", "Hello world ")
    kept = StopChecker(SamplingParams(stop=["STOP"], include_stop_str_in_output=True), None)
    assert kept.check([1], "ab STOP cd") == ("stop", "STOP", "ab STOP")
    # the earliest of several matches wins
    assert StopChecker(params, None).check([1], "a\n\nb STOP") == ("stop", "\n\n", "a")
    # only the new tail is searched: text already checked is not searched again
    tail = StopChecker(SamplingParams(stop=["xy"], min_tokens=2, max_tokens=50), None)
    assert tail.check([1], "xy") == (None, None, "xy")  # before min_tokens
    assert tail.check([1, 2], "xy ab") == (None, None, "xy ab")
    assert tail.check([1, 2, 3], "xy abx") == (None, None, "xy abx")
    assert tail.check([1, 2, 3, 4], "xy abxy") == ("stop", "xy", "xy ab")
    assert StopChecker(SamplingParams(stop=["xy"]), None).check([1], "0123xy", new_text_len=1) == (
        "stop",
        "xy",
        "0123",
    )
    # stop strings outrank length; length ends it otherwise
    short = StopChecker(SamplingParams(stop=["!"], max_tokens=2), None)
    assert short.check([1, 2], "hi!") == ("stop", "!", "hi")
    assert StopChecker(SamplingParams(max_tokens=2), None).check([1, 2], "hi") == ("length", None, "hi")


def _safe_reference(text: str, stop: list[str]) -> int:
    withheld = max(
        [k for s in stop for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])], default=0
    )
    return len(text) - withheld


def test_safe_text_length() -> None:
    assert safe_text_length("Hello wor", ["world"]) == 6
    assert safe_text_length("Hello", ["world"]) == 5
    assert safe_text_length("Hello w", ["world", "Hello w!"]) == 0
    assert safe_text_length("", ["abc"]) == 0
    rng = random.Random(0)
    for _ in range(500):
        stop = [
            "".join(rng.choice("ab") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))
        ]
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 8)))
        assert safe_text_length(text, stop) == _safe_reference(text, stop), (text, stop)
