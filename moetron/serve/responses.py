"""OpenAI response bodies and stream chunks built from the engine's cumulative `RequestOutput`s.

Streaming turns cumulative text into deltas. The start of a stop string must never reach a client
early (the engine cuts the text back once the stop string completes, and sent text cannot be
unsent): `ChoiceStream` holds such a tail back until the text outgrows it or the choice finishes.
Half UTF-8 characters never appear in the engine's text (its detokenizer holds them back).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from moetron.data.byte_level import char_to_byte
from moetron.data.tokenizer import Tokenizer
from moetron.infer.detokenizer import safe_text_length
from moetron.infer.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from moetron.serve import tool_calls
from moetron.serve.protocol import ChatCompletionRequest, CompletionRequest, EngineInput, _SamplingRequest


@dataclass(frozen=True)
class Endpoint:
    """What one OpenAI generation route answers with: the prefix of its ids, the "object" of its
    bodies and stream chunks, and the request field a prompt the engine refuses is reported on."""

    id_prefix: str
    object: str
    chunk_object: str
    prompt_field: str


COMPLETIONS = Endpoint("cmpl", "text_completion", "text_completion", "prompt")
CHAT = Endpoint("chatcmpl", "chat.completion", "chat.completion.chunk", "messages")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenText:
    """A token's raw bytes and display string (a lone piece of a UTF-8 character shows as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.backend.get_added_tokens_decoder())

    @lru_cache(maxsize=65536)  # noqa: B019 - one instance per server, tokens are few
    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        table = char_to_byte()
        if token_id not in self.special and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


# JSON has no -inf; OpenAI reports a vanishing probability as -9999.0.
MIN_LOGPROB = -9999.0


def _chosen(position: PositionLogprobs, token_id: int) -> float:
    entry = position.get(token_id)
    return max(entry.logprob, MIN_LOGPROB) if entry is not None else MIN_LOGPROB


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank)
    return [(t, max(lp.logprob, MIN_LOGPROB)) for t, lp in ranked[:k]]


def completion_logprobs(
    token_ids: list[int],
    positions: list[PositionLogprobs | None],
    k: int,
    tokens: TokenText,
    text_offset: int,
    as_ids: bool = False,
) -> dict:
    """/v1/completions' shape: parallel lists tokens / token_logprobs / top_logprobs / text_offset.
    as_ids (vLLM's return_tokens_as_token_ids): tokens named "token_id:N", unambiguous."""
    name = (lambda t: f"token_id:{t}") if as_ids else tokens.text
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, position in zip(token_ids, positions, strict=True):
        text = tokens.text(token_id)
        out["tokens"].append(name(token_id))
        out["token_logprobs"].append(None if position is None else _chosen(position, token_id))
        top = None if position is None else {name(t): lp for t, lp in _top(position, k)}
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int, tokens: TokenText, as_ids: bool = False
) -> dict:
    """/v1/chat/completions' shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def entry(token_id: int, logprob: float) -> dict:
        name = f"token_id:{token_id}" if as_ids else tokens.text(token_id)
        return {"token": name, "logprob": logprob, "bytes": list(tokens.bytes(token_id))}

    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        item = entry(token_id, _chosen(position, token_id))
        item["top_logprobs"] = [entry(t, lp) for t, lp in _top(position, k)]
        content.append(item)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None


@dataclass
class ChoiceStream:
    """Turns one choice's cumulative outputs into deltas that are safe to send."""

    stops: list[str] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0
    done: bool = False

    def advance(self, out: CompletionOutput) -> Delta | None:
        """The next delta, or None while nothing new can be sent."""
        if self.done:
            return None
        text = out.text
        end = len(text) if out.finished else safe_text_length(text, self.stops)
        if end <= self.sent_chars and not out.finished:
            return None
        delta = Delta(
            text=text[self.sent_chars : end] if end > self.sent_chars else "",
            token_ids=out.token_ids[self.sent_tokens :],
            logprobs=out.logprobs[self.sent_tokens :] if out.logprobs is not None else None,
            finish_reason=out.finish_reason,
        )
        self.sent_chars, self.sent_tokens = max(end, self.sent_chars), len(out.token_ids)
        self.done = out.finished
        return delta


class Renderer:
    """Shared by both endpoints: ids, usage, and one `ChoiceStream` per (prompt, sample)."""

    endpoint: Endpoint

    def __init__(
        self, model: str, tokens: TokenText, req: _SamplingRequest, inputs: list[EngineInput]
    ) -> None:
        self.id = new_id(self.endpoint.id_prefix)
        self.created = int(time.time())
        self.model, self.tokens, self.inputs, self.n = model, tokens, inputs, req.n
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.as_ids = req.return_tokens_as_token_ids
        self.choices: dict[tuple[int, int], ChoiceStream] = {}

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, outs: list[RequestOutput]) -> dict:
        return usage(sum(len(o.prompt_token_ids) for o in outs), sum(o.num_generated_tokens for o in outs))

    def deltas(self, i: int, out: RequestOutput) -> list[tuple[int, bool, Delta]]:
        """(choice index, is this the choice's first delta, delta) for each choice that moved."""
        moved = []
        for o in out.outputs:
            key = (i, o.index)
            first = key not in self.choices
            stream = self.choices.setdefault(key, ChoiceStream(stops=self.inputs[i].params.stop))
            delta = stream.advance(o)
            if delta is not None:
                moved.append((i * self.n + o.index, first, delta))
        return moved

    def chunk(self, choice: dict) -> dict:
        usage = {"usage": None} if self.include_usage else {}
        return {**self.head(self.endpoint.chunk_object), "choices": [choice], **usage}

    def response(self, outs: list[RequestOutput]) -> dict:
        """The whole body, from every engine request's final output."""
        raise NotImplementedError

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        """The stream chunks engine request i's latest output adds."""
        raise NotImplementedError

    def final_chunks(self, outs: list[RequestOutput]) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self.head(self.endpoint.chunk_object), "choices": [], "usage": self.usage(outs)}]


class CompletionRenderer(Renderer):
    endpoint = COMPLETIONS

    def __init__(
        self, model: str, tokens: TokenText, req: CompletionRequest, inputs: list[EngineInput]
    ) -> None:
        super().__init__(model, tokens, req, inputs)
        self.echo, self.logprobs = req.echo, req.logprobs
        self.prompt_texts = [
            inp.prompt if inp.prompt is not None else tokens.tokenizer.decode(inp.prompt_token_ids)
            for inp in inputs
        ]
        self.token_offsets: dict[int, int] = {}  # choice -> chars of token text sent (for text_offset)

    def _echoed(self, out: RequestOutput) -> tuple[list[int], list[PositionLogprobs | None]]:
        ids = out.prompt_token_ids
        positions = out.prompt_logprobs if out.prompt_logprobs is not None else [None] * len(ids)
        return list(ids), list(positions)

    def _logprobs(self, ids: list[int], positions: list, choice: int) -> dict | None:
        if self.logprobs is None:
            return None
        offset = self.token_offsets.get(choice, 0)
        result = completion_logprobs(ids, positions, self.logprobs, self.tokens, offset, self.as_ids)
        self.token_offsets[choice] = offset + sum(len(self.tokens.text(t)) for t in ids)
        return result

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            for o in out.outputs:
                index = i * self.n + o.index
                ids, positions = self._echoed(out) if self.echo else ([], [])
                logprobs = self._logprobs(
                    ids + o.token_ids, positions + (o.logprobs or [None] * len(o.token_ids)), index
                )
                text = (self.prompt_texts[i] if self.echo else "") + o.text
                choices.append(
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}
                )
        choices.sort(key=lambda c: c["index"])
        return {**self.head(self.endpoint.object), "choices": choices, "usage": self.usage(outs)}

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        result = []
        for index, first, delta in self.deltas(i, out):
            text, ids = delta.text, delta.token_ids
            positions = list(delta.logprobs or [None] * len(ids))
            if first and self.echo:
                prompt_ids, prompt_positions = self._echoed(out)
                text, ids, positions = (
                    self.prompt_texts[i] + text,
                    prompt_ids + ids,
                    prompt_positions + positions,
                )
            choice = {"index": index, "text": text, "logprobs": self._logprobs(ids, positions, index)}
            result.append(self.chunk({**choice, "finish_reason": delta.finish_reason}))
        return result


class ChatRenderer(Renderer):
    endpoint = CHAT

    def __init__(
        self, model: str, tokens: TokenText, req: ChatCompletionRequest, inputs: list[EngineInput]
    ) -> None:
        super().__init__(model, tokens, req, inputs)
        self.logprobs, self.top_logprobs = req.logprobs, req.top_logprobs or 0
        # With tools (and tool_choice not "none") the text is parsed for calls, streamed or not.
        self.parse_calls = bool(req.tools) and req.tool_choice != "none"
        self.call_ids: dict[tuple[int, int], str] = {}  # (choice, call) -> id, made once
        self.call_streams: dict[int, tool_calls.ToolCallStream] = {}
        self.held_logprobs: dict[int, tuple[list[int], list[PositionLogprobs]]] = {}

    def _logprobs(self, ids: list[int], positions: list[PositionLogprobs] | None) -> dict | None:
        if not self.logprobs or positions is None:
            return None
        return chat_logprobs(ids, positions, self.top_logprobs, self.tokens, self.as_ids)

    def _call_id(self, index: int, k: int) -> str:
        return self.call_ids.setdefault((index, k), f"call_{uuid.uuid4().hex[:24]}")

    def _finish_reason(self, parsed: tool_calls.Parsed, reason: str | None) -> str | None:
        return "tool_calls" if parsed.calls and reason == "stop" else reason  # "length" stays

    def _message(self, index: int, o: CompletionOutput) -> tuple[dict, str | None]:
        if not self.parse_calls:
            return {"role": "assistant", "content": o.text}, o.finish_reason
        parsed = tool_calls.parse(o.text, final=True)
        message = {"role": "assistant", "content": parsed.content or None}
        if parsed.calls:
            message["tool_calls"] = [
                {
                    "id": self._call_id(index, k),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for k, call in enumerate(parsed.calls)
            ]
        return message, self._finish_reason(parsed, o.finish_reason)

    def response(self, outs: list[RequestOutput]) -> dict:
        (out,) = outs
        choices = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            message, finish_reason = self._message(o.index, o)
            logprobs = self._logprobs(o.token_ids, o.logprobs)
            choices.append(
                {"index": o.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
            )
        return {**self.head(self.endpoint.object), "choices": choices, "usage": self.usage(outs)}

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        result = []
        for index, first, d in self.deltas(i, out):
            if first:  # OpenAI opens every choice with the role
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                result.append(self.chunk({**role, "finish_reason": None}))
            if self.parse_calls:
                result += self._call_chunks(index, d)
                continue
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(d.token_ids, d.logprobs)}
            result.append(self.chunk({**choice, "finish_reason": d.finish_reason}))
        return result

    def _call_chunks(self, index: int, d: Delta) -> list[dict]:
        """Content and tool-call deltas, each in its own chunk, then the finish. Logprobs of tokens
        whose text is held back ride on the next chunk that goes out."""
        if index not in self.call_streams:
            self.call_streams[index] = tool_calls.ToolCallStream(lambda k: self._call_id(index, k))
        stream = self.call_streams[index]
        final = d.finish_reason is not None
        deltas, parsed = stream.update(d.text, final)
        ids, positions = self.held_logprobs.setdefault(index, ([], []))
        ids += d.token_ids
        positions += d.logprobs or []
        events = [*deltas, {}] if final else deltas  # the finish goes out in a chunk of its own
        chunks = []
        for k, delta in enumerate(events):
            logprobs = self._logprobs(ids, positions) if ids else None
            ids, positions = [], []
            reason = self._finish_reason(parsed, d.finish_reason) if final and k == len(events) - 1 else None
            chunk = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            chunks.append(self.chunk(chunk))
        self.held_logprobs[index] = (ids, positions)
        return chunks
