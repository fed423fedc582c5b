"""Byte-level BPE, the scheme of GPT-2 and later (cl100k_base, the BPE we train): text is split with
GPT-4's pattern, each piece's UTF-8 bytes are written as printable characters, and BPE runs on
those. Vocabularies store tokens in that alphabet, so reading a token's raw bytes takes its inverse.
"""

from __future__ import annotations

from functools import cache

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

# GPT-4's (cl100k) pre-tokenizer split, also used for the BPE we train: digits in groups of at
# most three, contractions split off, punctuation runs kept apart from words.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_tokenizer(model: models.BPE) -> tokenizers.Tokenizer:
    """A byte-level BPE pipeline around `model`: GPT-4's split, then bytes as printable characters."""
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 take chr(256), chr(257), ... in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def char_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_char`."""
    return {char: b for b, char in byte_to_char().items()}
