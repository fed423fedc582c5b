"""Streaming text for generated tokens, and the stop conditions that end a sequence.

`IncrementalDetokenizer` turns one token at a time into text deltas without ever emitting half of a
multi-byte UTF-8 character, decoding only a short window of recent tokens per step. `StopChecker`
decides when a sequence is done (EOS, stop token, stop string, length). `safe_text_length` tells a
streaming server how much text it may send without revealing the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moetron.data.tokenizer import Tokenizer
from moetron.infer.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a decoder makes of an incomplete (or invalid) UTF-8 sequence
# Prompt tokens decoded in front of the output, so decoders that treat the start of a text
# specially (SentencePiece's leading-space strip) see the output mid-text, as vLLM does.
PROMPT_CONTEXT_TOKENS = 5


def _decoder(tokenizer: Any, skip_special_tokens: bool):
    """A `decode(ids) -> str` for a moetron Tokenizer, a `tokenizers.Tokenizer` or a transformers
    tokenizer (they name the skip flag differently)."""
    if isinstance(tokenizer, Tokenizer):
        return lambda ids: tokenizer.decode(ids, skip_special=skip_special_tokens)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """`add(token_id)` returns the text the new token completes (maybe ""); `text` is all of it.

    The window [prefix_offset, read_offset) holds tokens already turned into text and is decoded
    again only as context; a delta is the text past it, sent only when it does not end in U+FFFD
    (the bytes of a character split across tokens: hold back until the rest arrives). After each
    emission the window slides up, so each step decodes a few tokens, not the whole output.

    With a byte-level BPE tokenizer the concatenated deltas plus `flush()` equal
    `decode(output_ids)`. (With a SentencePiece-style decoder the first delta keeps the leading space
    that decoding the output alone would strip, as vLLM's streams do.)
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._decode = _decoder(tokenizer, skip_special_tokens)
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character (possible for raw token-id prompts) would make the first
        # output token's bytes join it; drop the context then, so the output decodes on its own.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self.text = ""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character (or a token with no text, e.g. a skipped special)
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back (bytes that never completed a character, shown as U+FFFD), for
        when the sequence finishes."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta


def safe_text_length(text: str, stop: Sequence[str]) -> int:
    """How much of `text` a stream may send now: its length minus the longest tail that is a proper
    prefix of some stop string (it could still grow into the stop string, which clients must never
    see). A complete stop string is the StopChecker's business; this only looks at tails."""
    withheld = 0
    for stop_str in stop:
        for size in range(min(len(stop_str) - 1, len(text)), withheld, -1):
            if text.endswith(stop_str[:size]):
                withheld = size
                break
    return len(text) - withheld


class StopChecker:
    """Per sequence (it remembers how much text it has searched): call `check` after each token.

    Returns (finish_reason, stop_reason, text): finish_reason None (running), "stop" or "length";
    stop_reason the stop token id or stop string (None for EOS or length); text the output text,
    cut before a stop string (or after it with include_stop_str_in_output). Order, as vLLM: nothing
    stops before min_tokens; then EOS (unless ignore_eos), stop token ids, stop strings, max_tokens.
    """

    def __init__(self, params: SamplingParams, eos_token_id: int | None) -> None:
        self.params = params
        self.eos_token_id = eos_token_id
        self._stop_token_ids = set(params.stop_token_ids)
        self._checked_len = 0  # text length already searched for stop strings

    def check(
        self, output_token_ids: Sequence[int], text: str, new_text_len: int | None = None
    ) -> tuple[str | None, int | str | None, str]:
        """`new_text_len`: how many trailing characters of `text` are new since the last call
        (default: everything past the text length this checker saw last time)."""
        params = self.params
        searched = self._checked_len if new_text_len is None else len(text) - new_text_len
        self._checked_len = len(text)
        num_tokens = len(output_token_ids)
        if num_tokens < params.min_tokens or num_tokens == 0:
            return None, None, text
        last = output_token_ids[-1]
        if not params.ignore_eos and last == self.eos_token_id:
            return "stop", None, text
        if last in self._stop_token_ids:
            return "stop", last, text
        found = self._find_stop_string(text, max(searched, 0))
        if found is not None:
            index, stop_str = found
            end = index + len(stop_str) if params.include_stop_str_in_output else index
            return "stop", stop_str, text[:end]
        if params.max_tokens is not None and num_tokens >= params.max_tokens:
            return "length", None, text
        return None, None, text

    def _find_stop_string(self, text: str, searched: int) -> tuple[int, str] | None:
        """The earliest stop string that ends in the new text (past `searched`)."""
        best: tuple[int, str] | None = None
        for stop_str in self.params.stop:
            # a match ending past `searched` starts at or after searched - len + 1
            index = text.find(stop_str, max(searched - len(stop_str) + 1, 0))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop_str)
        return best
