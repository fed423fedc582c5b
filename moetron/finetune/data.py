"""Fine-tuning data in the shapes users already have, as token ids with a loss mask.

    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   chat (OpenAI, trl)
    {"prompt": "...", "completion": "..."}                                        prompt / completion
    {"prompt": ..., "chosen": ..., "rejected": ...}                               preference pairs (DPO)

A conversation is rendered with the base model's chat template, one segment at a time: the text up
to an assistant turn (the template's own generation prompt included) is context, the assistant's
content through its end-of-turn marker is trained on. Each segment is tokenized on its own, as the
model meets it at inference (the prompt encoded, then its own tokens generated). A prompt /
completion pair is `bos + prompt` (context) then `completion + eos` (trained). For DPO the prompt
(text, or messages rendered with the generation prompt) is the context of both answers.

Bad lines name the file and line; a conversation without an assistant turn is skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetron.data.errors import DataError
from moetron.data.tokenizer import Tokenizer


@dataclass
class Example:
    """One training example: ids and, per id, whether its prediction is trained (the loss is on
    predicting ids[t] from ids[:t], for t with trained[t])."""

    ids: list[int]
    trained: list[bool]


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class Dataset:
    examples: list[Example]
    pairs: list[PreferencePair]
    num_skipped: int  # conversations with no assistant turn


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line; a bad line names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def load_dataset(path: str | Path, tokenizer: Tokenizer, train_on_prompt: bool = False) -> Dataset:
    """Every line of a JSONL file as an Example (chat, prompt/completion) or a PreferencePair.
    `train_on_prompt`: train on every token, not only the answers'."""
    examples, pairs, skipped = [], [], 0
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if "chosen" in row or "rejected" in row:
            pairs.append(_pair(row, tokenizer, where))
            continue
        if "messages" in row:
            example = _conversation(_messages(row["messages"], where), tokenizer, where)
        elif "prompt" in row and "completion" in row:
            prompt, completion = _text(row, "prompt", where), _text(row, "completion", where)
            context = [tokenizer.bos_id, *tokenizer.encode(prompt, allow_special=False)]
            answer = [*tokenizer.encode(completion, allow_special=False), tokenizer.eos_id]
            example = Example(context + answer, [False] * len(context) + [True] * len(answer))
        else:
            raise DataError(
                f"{where}: expected 'messages', 'prompt' + 'completion', or 'prompt' + 'chosen' + 'rejected'"
            )
        if example is None:
            skipped += 1
            continue
        if train_on_prompt:
            example.trained = [True] * len(example.ids)
        examples.append(example)
    return Dataset(examples, pairs, skipped)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a string 'content'")
        if message.get("role") not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: messages[{i}] has role {message.get('role')!r}; use system, user or assistant"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _conversation(messages: list[dict[str, str]], tokenizer: Tokenizer, where: str) -> Example | None:
    """Segments of the rendered conversation: context up to each assistant turn, the turn trained."""
    if not any(m["role"] == "assistant" for m in messages):
        return None
    ids: list[int] = []
    trained: list[bool] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (context.startswith(rendered) and turn.startswith(context)):
            raise DataError(f"{where}: the chat template does not render this conversation incrementally")
        new_context = tokenizer.encode(context[len(rendered) :])
        answer = tokenizer.encode(turn[len(context) :])
        ids += new_context + answer
        trained += [False] * len(new_context) + [True] * len(answer)
        rendered = turn
    return Example(ids, trained)


def _pair(row: dict, tokenizer: Tokenizer, where: str) -> PreferencePair:
    prompt = row.get("prompt")
    chosen, rejected = (_text(row, key, where) for key in ("chosen", "rejected"))
    if isinstance(prompt, list):  # a conversation: each answer as its assistant turn
        messages = _messages(prompt, where)
        context_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

        def answer(text: str) -> list[int]:
            turn = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": text}], add_generation_prompt=False
            )
            return tokenizer.encode(turn[len(context_text) :])

        return PreferencePair(tokenizer.encode(context_text), answer(chosen), answer(rejected))
    if isinstance(prompt, str):
        return PreferencePair(
            [tokenizer.bos_id, *tokenizer.encode(prompt, allow_special=False)],
            [*tokenizer.encode(chosen, allow_special=False), tokenizer.eos_id],
            [*tokenizer.encode(rejected, allow_special=False), tokenizer.eos_id],
        )
    raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
