"""OpenAI tool calling in Hermes / Qwen2.5's text format: prompts, parsing, streaming, grammars.

A model calls a function by writing `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(the format the bundled chat template teaches, data/tokenizer.py). Everything here works on that
text and on plain dicts (OpenAI's JSON), so it knows nothing of HTTP:

- `default_format` renders tools, calls and results as ordinary message text, for a chat
  template that knows nothing of tools (the same text the bundled template renders natively);
- `parse` splits generated text into content and calls. It is one stateless function of the text
  so far: streaming diffs its successive results (`ToolCallStream`), which makes the streamed
  reassembly equal the non-streamed response by construction;
- `call_grammar` is the Lark grammar (llguidance's dialect) that forces one or more calls whose
  arguments validate against the function's JSON schema (`tool_choice` "required" or named);
  `auto_call_grammar` leaves text free but constrains every call the model opens (`auto`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moetron.data.tokenizer import TOOLS_INSTRUCTIONS, TOOLS_PREAMBLE
from moetron.infer import structured_output
from moetron.infer.sampling_params import SamplingParamsError, StructuredOutputs

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class ToolCallError(ValueError):
    """A tools / tool_choice / messages problem; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# --- Requests: checks and the default text format.


def check_tools(tools: list[dict] | None, tool_choice: str | dict | None) -> None:
    """Raise ToolCallError for what OpenAI refuses: bad names, parameters that are not a JSON-schema
    object, a tool_choice without tools or naming an unknown function."""
    if tools is not None and not tools:
        raise ToolCallError("tools", "tools must list at least one function (or be left out)")
    names: set[str] = set()
    for k, tool in enumerate(tools or []):
        function = tool["function"]
        if not NAME_PATTERN.fullmatch(function["name"]):
            raise ToolCallError(
                "tools",
                f"tools[{k}].function.name={function['name']!r} must be 1-64 letters, digits, "
                "underscores or dashes",
            )
        if function["name"] in names:
            raise ToolCallError("tools", f"tools[{k}]: the function name {function['name']!r} is repeated")
        names.add(function["name"])
        parameters = function.get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ToolCallError(
                "tools",
                f"tools[{k}].function.parameters must be a JSON schema of type object, "
                f"not {parameters.get('type')!r}",
            )
    if tool_choice is None:
        return
    if not tools:
        raise ToolCallError("tool_choice", "tool_choice is only allowed when tools are given")
    if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in names:
        raise ToolCallError(
            "tool_choice",
            f"tool_choice names the function {tool_choice['function']['name']!r}, which is not in tools",
        )


def template_call(name: str, arguments: str) -> dict:
    """A call as chat templates read it: arguments as a mapping (transformers' convention) when
    the JSON text is an object, else the text."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    return {"name": name, "arguments": value if isinstance(value, dict) else arguments}


def tool_list_text(tools: list[dict]) -> str:
    """The system-turn text that lists `tools` (one JSON object per line)."""
    return (
        TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_INSTRUCTIONS
    )


def call_text(name: str, arguments: str | dict) -> str:
    """One call as the model writes it; arguments given as JSON text are kept verbatim."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def default_format(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` (with `tool_calls` and `tool` roles) and `tools` as plain system / user /
    assistant messages, rendering exactly as the bundled template renders them natively."""
    out = [dict(m) for m in messages]
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{tool_list_text(tools)}"
        else:
            out.insert(0, {"role": "system", "content": tool_list_text(tools)})
    plain: list[dict] = []
    for k, m in enumerate(out):
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if k > 0 and out[k - 1]["role"] == "tool":  # consecutive results share one user turn
                plain[-1] = {**plain[-1], "content": plain[-1]["content"] + "\n" + response}
            else:
                plain.append({"role": "user", "content": response})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [c.get("function", c) for c in m["tool_calls"]]
            parts = [m["content"]] if m.get("content") else []
            parts += [call_text(c["name"], c["arguments"]) for c in calls]
            plain.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            plain.append(m)
    return plain


# --- Parsing generated text.


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the raw JSON text of the arguments value (as far as it has been generated)
    complete: bool  # its </tool_call> has been seen


@dataclass(frozen=True)
class Parsed:
    content: str  # the text outside the calls ("" for none)
    calls: tuple[ParsedCall, ...]


class _Invalid(Exception):
    """The block cannot become a call, whatever follows."""


@dataclass
class _Block:
    name: str | None = None
    arguments: str | None = None
    end: int | None = None  # just past </tool_call>; None while the block is unfinished


def parse(text: str, final: bool) -> Parsed:
    """Content and calls in `text`. While not `final`, the result holds back what may still turn
    out otherwise, so that it is a prefix of the final result (content a prefix of its content,
    each call's arguments a prefix of its arguments): a trailing partial "<tool_call>", a content
    segment that is only whitespace so far, a call whose name is not complete, text after the
    arguments value. A block whose JSON cannot be a call stays in the content, tags and all; a
    call cut off at the end (final) is reported with the arguments it has, as OpenAI does."""
    segments: list[str] = []  # content between the calls; whitespace-only ones are dropped
    calls: list[ParsedCall] = []
    segment_start = pos = 0
    hold_from = None  # non-final: content stops here
    while (start := text.find(OPEN, pos)) >= 0:
        try:
            block = _read_block(text, start + len(OPEN))
        except _Invalid:
            close = text.find(CLOSE, start)
            if close < 0:  # everything from here is content, whatever follows
                pos = len(text)
                break
            pos = close + len(CLOSE)
            continue
        if block.name is None:  # unfinished, and not yet known to be a call
            if final:
                pos = len(text)
            else:
                hold_from = start
            break
        segments.append(text[segment_start:start])
        calls.append(ParsedCall(block.name, block.arguments or "", block.end is not None))
        if block.end is None:
            segment_start = pos = len(text)
            break
        segment_start = pos = block.end
    else:
        if not final:  # a partial "<tool_call>" at the very end
            hold_from = len(text) - next(
                (k for k in range(len(OPEN) - 1, 0, -1) if text.endswith(OPEN[:k])), 0
            )
    tail = text[segment_start : hold_from if hold_from is not None else len(text)]
    content = "".join(s for s in [*segments, tail] if s.strip())
    return Parsed(content, tuple(calls))


def _read_block(text: str, i: int) -> _Block:
    """Walk the call object after "<tool_call>" key by key; raise _Invalid at the first thing that
    rules a call out. An unfinished block reports what is certain: the name once its string is
    complete, the arguments as far as they go."""
    block, n = _Block(), len(text)
    i = _skip_space(text, i)
    if i == n:
        return block
    if text[i] != "{":
        raise _Invalid
    i, first = i + 1, True
    while True:
        i = _skip_space(text, i)
        if i == n:
            return _unfinished(block)
        if first and text[i] == "}":
            raise _Invalid  # {} names no function
        key_end = _value_end(text, i)
        if key_end is None:
            return _unfinished(block)
        key = _decode(text, i, key_end)
        if not isinstance(key, str) or (key in ("name", "arguments") and getattr(block, key) is not None):
            raise _Invalid
        i = _skip_space(text, key_end)
        if i == n:
            return _unfinished(block)
        if text[i] != ":":
            raise _Invalid
        i = _skip_space(text, i + 1)
        if key == "arguments" and i < n and text[i] != "{":
            raise _Invalid  # OpenAI's arguments are a JSON object
        end = _value_end(text, i) if i < n else None
        if end is None:
            if key == "arguments":
                block.arguments = text[i:]
            return _unfinished(block)
        value = _decode(text, i, end)
        if key == "name":
            if not isinstance(value, str):
                raise _Invalid
            block.name = value
        elif key == "arguments":
            block.arguments = text[i:end]
        i, first = _skip_space(text, end), False
        if i == n:
            return _unfinished(block)
        if text[i] == "}":
            break
        if text[i] != ",":
            raise _Invalid
        i += 1
    if block.name is None or block.arguments is None:
        raise _Invalid
    i = _skip_space(text, i + 1)
    if text.startswith(CLOSE, i):
        block.end = i + len(CLOSE)
        return block
    if not CLOSE.startswith(text[i:]):
        raise _Invalid
    return block


def _unfinished(block: _Block) -> _Block:
    # Arguments seen before the name (or while it is partial) wait until the name is known.
    return block if block.name is not None else _Block()


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


# A JSON string (group 1: its closing quote, when it has come) or a bracket; and a bare scalar.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*(")?|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(r"[-+.\w]*")


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON value starting at i ends (just past it), or None if the text ends first. Only
    delimits (with a regex: this runs on every streamed token); `_decode` then checks the value."""
    if text[i] not in '"{[':
        end = _SCALAR.match(text, i).end()
        return end if end < len(text) else None  # a number may go on
    depth = 0
    for token in _STRING_OR_BRACKET.finditer(text, i):
        if token.group()[0] == '"':
            if token.group(1) is None:
                return None  # the string goes on
        else:
            depth += 1 if token.group() in "{[" else -1
        if depth == 0:
            return token.end()
    return None


def _decode(text: str, start: int, end: int) -> Any:
    try:
        value, stop = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        raise _Invalid from None
    if stop != end:
        raise _Invalid
    return value


# --- Streaming.


class ToolCallStream:
    """One choice's stream in OpenAI's delta shapes: content, then per call a delta that opens it
    (id, name, empty arguments) and fragments of its arguments. Each update parses the whole text
    so far and sends what the previous parse had not."""

    def __init__(self, call_id: Callable[[int], str]) -> None:
        self.call_id = call_id
        self.text = ""
        self.sent_content = ""
        self.sent_arguments: list[str] = []

    def update(self, new_text: str, final: bool) -> tuple[list[dict], Parsed]:
        """The deltas `new_text` (appended to the text so far) adds, and the parse they come from."""
        self.text += new_text
        parsed = parse(self.text, final)
        deltas: list[dict] = []
        # A parse that is not an extension of what was sent (a call whose JSON broke after it was
        # streamed) cannot be unsent: such parts are left as they went out.
        if len(parsed.content) > len(self.sent_content) and parsed.content.startswith(self.sent_content):
            deltas.append({"content": parsed.content[len(self.sent_content) :]})
            self.sent_content = parsed.content
        for k, call in enumerate(parsed.calls):
            if k == len(self.sent_arguments):
                function = {"name": call.name, "arguments": ""}
                deltas.append(
                    {
                        "tool_calls": [
                            {"index": k, "id": self.call_id(k), "type": "function", "function": function}
                        ]
                    }
                )
                self.sent_arguments.append("")
            sent = self.sent_arguments[k]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                fragment = call.arguments[len(sent) :]
                deltas.append({"tool_calls": [{"index": k, "function": {"arguments": fragment}}]})
                self.sent_arguments[k] = call.arguments
        return deltas, parsed


# --- Constrained calls.


def is_forced(tool_choice: str | dict | None) -> bool:
    """tool_choice "required" or a named function: the reply must be calls."""
    return tool_choice == "required" or isinstance(tool_choice, dict)


def grammar_for(tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool) -> str | None:
    """The checked grammar the tools impose: calls only for "required" or a named function, free
    text with constrained calls for "auto" (the default with tools), None for "none"."""
    if not tools or tool_choice == "none":
        return None
    if is_forced(tool_choice):
        only = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        grammar = call_grammar(tools, only, parallel)
    else:
        grammar = auto_call_grammar(tools)
    check_grammar(grammar)
    return grammar


def auto_call_grammar(tools: list[dict]) -> str:
    """Free text in which every `<tool_call>` the model opens continues as a valid call (compact
    JSON, arguments following the function's schema) and closes: the trigger is a lazy lexeme,
    matched wherever the text first ends in it (llguidance's tool-calling pattern). Special tokens
    other than EOS / the end of turn stay out of the text; parallel_tool_calls is not enforced."""
    return (
        "%llguidance {}\n"
        "start: call* TEXT\n"
        f'call: call_open "\\n" %json {json.dumps(_call_schema(tools, None))} "\\n{CLOSE}"\n'
        f'call_open[lazy]: TEXT "{OPEN}"\n'
        "TEXT: /(.|\\n)*/\n"
    )


def call_grammar(tools: list[dict], only: str | None, parallel: bool) -> str:
    """Lark (llguidance's dialect) for one call, or several separated by newlines when `parallel`,
    to any of `tools` (or the one named `only`): compact JSON whose arguments follow the function's
    schema."""
    schema = _call_schema(tools, only)
    call = f'"{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return f"{start}\ncall: {call}\n"


def _call_schema(tools: list[dict], only: str | None) -> dict:
    """A call's JSON schema: {"name": one of the functions, "arguments": its parameters}. Each
    parameters schema moves under the root's $defs, so its local "$ref"s still resolve."""
    functions = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    definitions = {
        f["name"]: _rebase_refs(f.get("parameters") or NO_PARAMETERS, f["name"]) for f in functions
    }
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/{name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in definitions
    ]
    # No free whitespace: a model given it may pad with newlines until max_tokens.
    return {"anyOf": alternatives, "$defs": definitions, "x-guidance": {"whitespace_flexible": False}}


def check_grammar(grammar: str) -> None:
    """ToolCallError (on `tools`) unless the engine's grammar check passes `grammar` (a schema
    llguidance cannot read), checked as the engine will compile it."""
    try:
        structured_output.check(StructuredOutputs(grammar=grammar))
    except SamplingParamsError as e:
        first_line = str(e).splitlines()[0]  # the rest repeats the grammar
        raise ToolCallError("tools", f"the function parameters cannot be enforced: {first_line}") from None


def _rebase_refs(schema: Any, name: str) -> Any:
    """`schema` with each local "$ref" (a JSON pointer "#/...") pointing into /$defs/<name>, where
    the schema will live."""
    if isinstance(schema, dict):
        return {
            k: f"#/$defs/{name}{v[1:]}"
            if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/"))
            else _rebase_refs(v, name)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase_refs(v, name) for v in schema]
    return schema
