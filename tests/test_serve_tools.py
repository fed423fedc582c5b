"""OpenAI tool calling: the chat template (against transformers), the Python fallback for templates
that know nothing of tools, the parser (property: what streams is a prefix of the final answer),
the grammar that forces calls (checked with llguidance directly), and the server end to end.

The server tests use the official `openai` client. Parsing and streaming run against a scripted
engine (it answers with a given text), so they need no model; `tool_choice` "required" and named
calls run the real engine on a tiny random model, whose arguments must validate against the
function's schema: that only the grammar can guarantee.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import openai
import pytest
from conftest import API_KEY, HANG_GUARD_S, assert_openai_error
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve_http import FakeEngine

from moetron.data.tokenizer import TOOLS_INSTRUCTIONS, TOOLS_PREAMBLE, Tokenizer
from moetron.serve import protocol as P
from moetron.serve import tool_calls
from moetron.serve.tool_calls import Parsed, ParsedCall, ToolCallStream, parse

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A conversation with every tool-related shape: calls with and without content, arguments as
# OpenAI's JSON text and as a mapping, two results in a row.
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Oslo?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo","unit":"c"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": {"zone": "cet"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
    {"role": "assistant", "content": "-3 C at 09:00."},
    {"role": "user", "content": "And tomorrow?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_3",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", "days": 2}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_3", "content": "-1 C"},
]

# The bundled template as it was before tools: a template that knows nothing of them.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    return Tokenizer(
        tokenizer.backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=PLAIN_TEMPLATE,
    )


# --- The chat template.


def test_template_renders_the_hermes_format(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_time", "arguments": {"zone": "utc"}}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "12:00"},
    ]
    tools_text = f"{TOOLS_PREAMBLE}\n{json.dumps(CLOCK)}{TOOLS_INSTRUCTIONS}"
    assert tokenizer.apply_chat_template(messages, tools=[CLOCK]) == (
        f"<|bos|><|system|>\n{tools_text}<|end|>\n<|user|>\nWeather?<|end|>\n"
        '<|assistant|>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call><|end|>\n'
        "<|user|>\n<tool_response>\n12:00\n</tool_response><|end|>\n<|assistant|>\n"
    )
    assert tools_text.startswith("# Tools\n\nYou may call one or more functions")
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], tools=[CLOCK]
    )
    assert with_system.startswith(f"<|bos|><|system|>\nBe brief.\n\n{tools_text}<|end|>\n<|user|>")


def test_ordinary_messages_render_as_before(tokenizer) -> None:
    plain = _plain_tokenizer(tokenizer)
    ordinary = [m for m in HISTORY if m["role"] != "tool" and "tool_calls" not in m]
    for add_generation_prompt in (True, False):
        assert tokenizer.apply_chat_template(ordinary, add_generation_prompt) == plain.apply_chat_template(
            ordinary, add_generation_prompt
        )
    assert tokenizer.chat_template_knows_tools and not plain.chat_template_knows_tools


@pytest.mark.parametrize("start", [0, 1], ids=["system", "no-system"])
def test_template_with_tools_matches_transformers(tokenizer, tmp_path, start) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer.save(tmp_path / "t"))
    messages = HISTORY[start:]
    for add_generation_prompt in (True, False):
        theirs = hf.apply_chat_template(
            messages, tools=TOOLS, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert tokenizer.apply_chat_template(messages, add_generation_prompt, tools=TOOLS) == theirs


@pytest.mark.parametrize("start", [0, 1], ids=["system", "no-system"])
def test_default_format_renders_as_the_native_template(tokenizer, start) -> None:
    """A template without tools gets them as text: the same prompt the bundled template makes."""
    plain = _plain_tokenizer(tokenizer)
    messages = HISTORY[start:]
    native = tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert plain.apply_chat_template(tool_calls.default_format(messages, TOOLS)) == native
    no_tools = tokenizer.apply_chat_template(messages)  # results and calls alone
    assert plain.apply_chat_template(tool_calls.default_format(messages, None)) == no_tools
    # The server's path: OpenAI messages, either template.
    requests = [P.ChatMessage.model_validate(m) for m in _with_arguments(messages, as_text=True)]
    assert P.render_chat(requests, plain, True, TOOLS) == P.render_chat(requests, tokenizer, True, TOOLS)


def _with_arguments(messages: list[dict], as_text: bool) -> list[dict]:
    """`messages` with every call's arguments as JSON text (as OpenAI clients send them) or as a
    mapping (as the server hands them to templates)."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = []
            for c in m["tool_calls"]:
                arguments = c["function"]["arguments"]
                if as_text and not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                elif not as_text and isinstance(arguments, str):
                    arguments = json.loads(arguments)
                calls.append({**c, "function": {**c["function"], "arguments": arguments}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


# --- The parser.


def _call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_parse_content_and_calls() -> None:
    weather = _call("get_weather", '{"city": "Oslo"}')
    text = f"Let me check.\n{weather}\n{_call('get_time', '{}')}\n"
    assert parse(text, final=True) == Parsed(
        "Let me check.\n",
        (ParsedCall("get_weather", '{"city": "Oslo"}', True), ParsedCall("get_time", "{}", True)),
    )
    # Arguments before the name, compact JSON, text around: all read.
    text = 'a <tool_call>{"arguments":{"x":[1,{"y":"}"}]},"name":"f"}</tool_call> b'
    assert parse(text, final=True) == Parsed("a  b", (ParsedCall("f", '{"x":[1,{"y":"}"}]}', True),))


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>',  # arguments must be an object
        '<tool_call>\n{"name": "f"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {}} and more\n</tool_call>',
    ],
)
def test_a_block_that_is_no_call_stays_in_the_content(block) -> None:
    text = f"Hm. {block} {_call('g', '{}')}"
    assert parse(text, final=True) == Parsed(f"Hm. {block} ", (ParsedCall("g", "{}", True),))


def test_parse_holds_back_what_may_change() -> None:
    assert parse("Sure <tool_c", final=False) == Parsed("Sure ", ())
    assert parse("Sure <tool_c", final=True) == Parsed("Sure <tool_c", ())
    assert parse(f"{_call('f', '{}')}\n  ", final=False) == Parsed("", (ParsedCall("f", "{}", True),))
    partial = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'
    assert parse(partial, final=False).calls == (ParsedCall("get_weather", '{"city": "Os', False),)
    # Cut off at the end: the call as far as it goes (OpenAI's answer under finish_reason "length").
    assert parse(partial, final=True).calls == (ParsedCall("get_weather", '{"city": "Os', False),)
    assert parse('<tool_call>\n{"name": "get_wea', final=False) == Parsed("", ())
    assert parse('<tool_call>\n{"name": "get_wea', final=True) == Parsed('<tool_call>\n{"name": "get_wea', ())
    assert parse(" \n ", final=True) == Parsed("", ())


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-999, 999)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _call_block(draw: st.DrawFn) -> str:
    name = draw(st.from_regex(r"[a-z_]{1,8}", fullmatch=True))
    arguments = draw(st.dictionaries(st.text(max_size=4), _json, max_size=3))
    separators = (",", ":") if draw(st.booleans()) else (", ", ": ")
    pairs = [("name", name), ("arguments", arguments)]
    if draw(st.booleans()):
        pairs.reverse()
    body = (
        "{"
        + separators[0].join(
            f"{json.dumps(k)}{separators[1]}{json.dumps(v, separators=separators)}" for k, v in pairs
        )
        + "}"
    )
    return f"<tool_call>\n{body}\n</tool_call>"


_content = st.text(alphabet='ab <>{}"\n:,tol', max_size=12)  # no "_": never a whole tag
_broken = st.sampled_from(
    [
        "<tool_call>\nnot json\n</tool_call>",
        "<tool_call>\n[1]\n</tool_call>",
        '<tool_call>\n{"name": 3}\n</tool_call>',
        "<tool_call>\n{}\n</tool_call>",
    ]
)
_texts = st.lists(st.one_of(_content, _call_block(), _broken), max_size=6).map("".join)


def _is_prefix(early: Parsed, final: Parsed) -> bool:
    if not final.content.startswith(early.content) or len(early.calls) > len(final.calls):
        return False
    return all(
        e.name == f.name and f.arguments.startswith(e.arguments) and (f.complete or not e.complete)
        for e, f in zip(early.calls, final.calls, strict=False)
    )


@settings(max_examples=300, deadline=None)
@given(text=_texts, data=st.data())
def test_what_streams_is_a_prefix_of_the_final_parse(text, data) -> None:
    end = data.draw(st.integers(0, len(text)), label="end")  # the final text may be cut off (length)
    cut = data.draw(st.integers(0, end), label="cut")
    final = parse(text[:end], final=True)
    assert _is_prefix(parse(text[:cut], final=False), final)
    # Streamed in random pieces (the last one final), the deltas add up to the final parse.
    bounds = sorted({0, end, *data.draw(st.lists(st.integers(0, end), max_size=5), label="pieces")})
    pieces = list(itertools.pairwise(bounds)) or [(0, 0)]
    stream = ToolCallStream(lambda k: f"id{k}")
    deltas = [d for a, b in pieces for d in stream.update(text[a:b], final=b == end)[0]]
    assert _reassemble(deltas) == (
        final.content,
        [(f"id{k}", c.name, c.arguments) for k, c in enumerate(final.calls)],
    )


def _reassemble(deltas: list[dict]) -> tuple[str, list[tuple[str, str, str]]]:
    """Content and (id, name, arguments) per call from OpenAI-shaped deltas, as a client joins them."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for c in delta.get("tool_calls") or []:
            if c["index"] not in calls:
                assert set(c) == {"index", "id", "type", "function"} and c["function"]["arguments"] == ""
                calls[c["index"]] = [c["id"], c["function"]["name"], ""]
            else:
                assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
                calls[c["index"]][2] += c["function"]["arguments"]
    return content, [tuple(calls[k]) for k in sorted(calls)]


# --- The grammar that forces calls.


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
    )


def _matcher(ll_tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    tool_calls.check_grammar(grammar)
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher


@pytest.fixture(scope="module")
def accepts(tokenizer, ll_tokenizer):
    def accepts(grammar: str, text: str) -> bool:
        """Whether the grammar takes `text` token by token and may end after it."""
        matcher = _matcher(ll_tokenizer, grammar)
        return all(matcher.consume_token(t) for t in tokenizer.encode(text)) and matcher.is_accepting()

    return accepts


def test_grammar_takes_compact_valid_calls_only(tokenizer, ll_tokenizer, accepts) -> None:
    def call(name: str, arguments: dict) -> str:
        compact = json.dumps(arguments, separators=(",", ":"))
        return f'<tool_call>\n{{"name":"{name}","arguments":{compact}}}\n</tool_call>'

    one, named, parallel = (
        tool_calls.call_grammar(TOOLS, None, parallel=False),
        tool_calls.call_grammar(TOOLS, "get_time", parallel=False),
        tool_calls.call_grammar(TOOLS, None, parallel=True),
    )
    weather, clock = (
        call("get_weather", {"city": "Oslo", "unit": "c", "days": 3}),
        call("get_time", {"zone": "cet"}),
    )
    assert accepts(one, weather) and accepts(one, clock)
    assert accepts(named, clock) and not accepts(named, weather)
    assert accepts(parallel, f"{weather}\n{clock}")
    assert not accepts(one, f"{weather}\n{clock}")
    refused = [
        weather.replace('"name":', '"name": '),  # free whitespace
        call("get_weather", {"city": "Oslo"}),  # unit is required
        call("get_weather", {"city": "Oslo", "unit": "k"}),
        call("get_weather", {"city": "Oslo", "unit": "c", "days": 9}),
        call("get_weather", {"city": "Oslo", "unit": "c", "wind": 1}),  # no other properties
        call("get_forecast", {}),
        f"Sure. {clock}",
    ]
    for text in refused:
        assert not accepts(one, text), text
    # After one call (parallel_tool_calls=false) the grammar is done: the engine finishes with "stop".
    matcher = _matcher(ll_tokenizer, one)
    assert all(matcher.consume_token(t) for t in tokenizer.encode(clock)) and matcher.is_stopped()


def test_grammar_keeps_local_refs_and_empty_parameters(accepts) -> None:
    location = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    parameters = {
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/Location"}},
        "required": ["at"],
        "$defs": {"Location": location},
    }
    tools = [
        {"type": "function", "function": {"name": "find", "parameters": parameters}},
        {"type": "function", "function": {"name": "ping"}},
    ]
    grammar = tool_calls.call_grammar(tools, None, parallel=False)
    assert accepts(grammar, '<tool_call>\n{"name":"find","arguments":{"at":{"city":"Oslo"}}}\n</tool_call>')
    assert not accepts(
        grammar, '<tool_call>\n{"name":"find","arguments":{"at":{"town":"Oslo"}}}\n</tool_call>'
    )
    assert accepts(grammar, '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{"name":"ping","arguments":{"x":1}}\n</tool_call>')


@pytest.mark.parametrize("parallel", [False, True])
def test_random_walks_through_the_grammar_are_valid_calls(tokenizer, ll_tokenizer, parallel) -> None:
    """Any token sequence the grammar allows parses into calls whose arguments validate."""
    rng = random.Random(0)
    grammar = tool_calls.call_grammar(TOOLS, None, parallel)
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    for _ in range(10):
        matcher, ids = _matcher(ll_tokenizer, grammar), []
        while not matcher.is_stopped() and len(ids) < 300:
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
            bits = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[: tokenizer.vocab_size]
            token = rng.choice(np.flatnonzero(bits).tolist())
            if token == tokenizer.eos_id:
                break
            assert matcher.consume_token(token)
            ids.append(token)
        parsed = parse(tokenizer.decode(ids), final=True)
        assert parsed.content == "" and parsed.calls and (parallel or len(parsed.calls) == 1)
        for call in parsed.calls if len(ids) < 300 else parsed.calls[:-1]:
            assert call.complete
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_auto_grammar_leaves_text_free_and_constrains_every_call(tokenizer, ll_tokenizer, accepts) -> None:
    auto = tool_calls.auto_call_grammar(TOOLS)
    clock = '<tool_call>\n{"name":"get_time","arguments":{"zone":"cet"}}\n</tool_call>'
    weather = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}\n</tool_call>'
    for text in ("", "Sure, it is sunny.\nNo call needed: <tool or tool_call>", f"Let me check.\n{clock}",
                 f"{weather}\n{clock}", f"{clock} and then some words"):  # fmt: skip
        assert accepts(auto, text), text
    for text in (
        'Let me check.\n<tool_call>\n{"name": "get_time"',  # free whitespace inside a call
        '<tool_call>\n{"name":"get_forecast"',  # no such function
        weather.replace('"unit":"c"', '"unit":"k"'),
        '<tool_call>\n{"name":"get_time","arguments":{"zone":"cet"}}\n and no close',
    ):
        matcher = _matcher(ll_tokenizer, auto)
        assert not all(matcher.consume_token(t) for t in tokenizer.encode(text)), text
    # Outside a call the reply may end at once (EOS); inside one it may not.
    matcher = _matcher(ll_tokenizer, auto)
    assert all(matcher.consume_token(t) for t in tokenizer.encode("Fine.")) and matcher.is_accepting()
    matcher = _matcher(ll_tokenizer, auto)
    assert (
        all(matcher.consume_token(t) for t in tokenizer.encode("<tool_call>\n{"))
        and not matcher.is_accepting()
    )


def test_random_walks_after_an_opened_call_are_valid_calls(tokenizer, ll_tokenizer) -> None:
    """In "auto", whatever the model writes once it opens a call parses into a valid call."""
    rng = random.Random(1)
    auto = tool_calls.auto_call_grammar(TOOLS)
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    for _ in range(10):
        matcher = _matcher(ll_tokenizer, auto)
        ids = tokenizer.encode("Let me look that up.\n<tool_call>")
        assert all(matcher.consume_token(t) for t in ids)
        while len(ids) < 200 and not tokenizer.decode(ids).endswith("</tool_call>"):
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
            bits = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[: tokenizer.vocab_size]
            token = rng.choice(np.flatnonzero(bits).tolist())
            assert token != tokenizer.eos_id  # a call once opened must close
            assert matcher.consume_token(token)
            ids.append(token)
        parsed = parse(tokenizer.decode(ids), final=True)
        assert parsed.content == "Let me look that up.\n"
        if len(ids) < 200:
            (call,) = parsed.calls
            assert call.complete
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


# --- The server, on a scripted engine: parsing, streaming, errors.


class ScriptedEngine(FakeEngine):
    """Answers every request with `reply`, one token per step, then EOS (finish "stop"), and keeps
    the prompt and sampling parameters of each request it was given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer, script=[])
        self.max_model_len = 4096  # prompts carry the tools' schemas
        self.reply = ""
        self.received: list[tuple[str | None, object]] = []

    def add_request(self, prompt_token_ids, params, request_id=None, prompt=None):
        self.received.append((prompt, params))
        super().add_request(prompt_token_ids, params, request_id, prompt)
        reply = self.tokenizer.encode(self.reply, allow_special=False)
        self.requests[request_id]["script"] = [*reply, self.tokenizer.eos_id]
        return request_id

    def _next_token(self, req: dict, i: int, sample: dict) -> int:
        return req["script"][len(sample["ids"])]


CALL_ID = re.compile(r"call_[0-9a-f]{24}")
USER = [{"role": "user", "content": "Weather and time in Oslo?"}]
REPLY = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "cet"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def scripted(tokenizer, serve_in_process):
    engine = ScriptedEngine(tokenizer)
    with serve_in_process(engine, model_name="fake") as srv:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
        )
        yield engine, srv, client


def _stream(client: openai.OpenAI, **kwargs) -> tuple[str | None, list[tuple[str, str, str]], str, list]:
    """(content, [(id, name, arguments)], finish_reason, chunks) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    content, calls = _reassemble(deltas)
    (reason,) = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason == reason  # the finish comes last
    return content or None, calls, reason, chunks


def _answer(response) -> tuple[str | None, list[tuple[str, str, str]], str]:
    (choice,) = response.choices
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


def test_auto_parses_calls_streamed_or_not(scripted, tokenizer) -> None:
    engine, _, client = scripted
    engine.reply = REPLY
    content, calls, reason = _answer(client.chat.completions.create(model="fake", messages=USER, tools=TOOLS))
    assert content == "Let me check.\n" and reason == "tool_calls"
    assert [(name, args) for _, name, args in calls] == [
        ("get_weather", '{"city": "Oslo", "unit": "c"}'),
        ("get_time", '{"zone": "cet"}'),
    ]
    assert all(CALL_ID.fullmatch(i) for i, _, _ in calls) and len({i for i, _, _ in calls}) == 2
    prompt, params = engine.received[-1]
    assert prompt == tokenizer.apply_chat_template(USER, tools=TOOLS)
    assert params.structured_outputs.grammar == tool_calls.auto_call_grammar(TOOLS)  # calls constrained
    streamed_content, streamed_calls, streamed_reason, _ = _stream(
        client, model="fake", messages=USER, tools=TOOLS
    )
    assert (streamed_content, streamed_reason) == (content, reason)
    assert [c[1:] for c in streamed_calls] == [c[1:] for c in calls]
    assert all(CALL_ID.fullmatch(i) for i, _, _ in streamed_calls)


def test_plain_answers_and_broken_calls_are_content(scripted) -> None:
    engine, _, client = scripted
    for reply in ("Just text, no call.", "<tool_call>\nnot json\n</tool_call> sorry"):
        engine.reply = reply
        assert _answer(client.chat.completions.create(model="fake", messages=USER, tools=TOOLS)) == (
            reply,
            [],
            "stop",
        )
        assert _stream(client, model="fake", messages=USER, tools=TOOLS)[:3] == (reply, [], "stop")


def test_tool_choice_none_renders_tools_but_never_parses(scripted, tokenizer) -> None:
    engine, _, client = scripted
    engine.reply = REPLY
    answer = _answer(
        client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, tool_choice="none")
    )
    assert answer == (REPLY, [], "stop")
    assert engine.received[-1][0] == tokenizer.apply_chat_template(USER, tools=TOOLS)
    assert engine.received[-1][1].structured_outputs is None  # "none": nothing constrained
    assert _stream(client, model="fake", messages=USER, tools=TOOLS, tool_choice="none")[:3] == answer


def test_auto_with_a_response_format_keeps_the_formats_grammar(scripted) -> None:
    engine, _, client = scripted
    engine.reply = "{}"
    client.chat.completions.create(
        model="fake", messages=USER, tools=TOOLS, response_format={"type": "json_object"}
    )
    assert engine.received[-1][1].structured_outputs.json_object  # calls are then parsed only


def test_a_call_cut_by_max_tokens_keeps_what_it_has(scripted, tokenizer) -> None:
    engine, _, client = scripted
    engine.reply = REPLY
    cut = len(tokenizer.encode('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"ci'))
    content, calls, reason = _answer(
        client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, max_tokens=cut)
    )
    assert reason == "length" and content == "Let me check.\n"
    ((_, name, arguments),) = calls
    assert name == "get_weather" and '{"city": "Oslo", "unit": "c"}'.startswith(arguments) and arguments
    streamed = _stream(client, model="fake", messages=USER, tools=TOOLS, max_tokens=cut)
    assert (streamed[0], [c[1:] for c in streamed[1]], streamed[2]) == (
        content,
        [c[1:] for c in calls],
        reason,
    )


def test_history_with_calls_and_results_is_rendered(scripted, tokenizer) -> None:
    engine, _, client = scripted
    engine.reply = "Cold."
    messages = _with_arguments(HISTORY, as_text=True)
    assert _answer(client.chat.completions.create(model="fake", messages=messages, tools=TOOLS)) == (
        "Cold.",
        [],
        "stop",
    )
    assert engine.received[-1][0] == tokenizer.apply_chat_template(
        _with_arguments(HISTORY, as_text=False), tools=TOOLS
    )


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "only"),
    [
        ("required", True, None),
        ("required", False, None),
        ({"type": "function", "function": {"name": "get_time"}}, False, "get_time"),
    ],
)
def test_required_and_named_choices_send_the_call_grammar(scripted, tool_choice, parallel, only) -> None:
    engine, _, client = scripted
    engine.reply = '<tool_call>\n{"name":"get_time","arguments":{"zone":"utc"}}\n</tool_call>'
    answer = _answer(
        client.chat.completions.create(
            model="fake", messages=USER, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel
        )
    )
    assert (
        answer[0] is None
        and [c[1:] for c in answer[1]] == [("get_time", '{"zone":"utc"}')]
        and answer[2] == "tool_calls"
    )
    structured = engine.received[-1][1].structured_outputs
    assert structured is not None and structured.grammar == tool_calls.call_grammar(TOOLS, only, parallel)


def _body(**fields) -> dict:
    return {"messages": USER, "tools": TOOLS, **fields}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            _body(tools=[{"type": "function", "function": {"description": "no name"}}]),
            "tools",
        ),
        ("/v1/chat/completions", _body(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools"),
        ("/v1/chat/completions", _body(tools=[WEATHER, WEATHER]), "tools"),
        ("/v1/chat/completions", _body(tools=[]), "tools"),
        (
            "/v1/chat/completions",
            _body(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
            "tools",
        ),
        (
            "/v1/chat/completions",
            _body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
            "tools",
        ),
        ("/v1/chat/completions", _body(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools"),
        (
            "/v1/chat/completions",
            _body(tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
        ("/v1/chat/completions", _body(tool_choice="sometimes"), "tool_choice"),
        ("/v1/chat/completions", {"messages": USER, "tool_choice": "auto"}, "tool_choice"),
        (
            "/v1/chat/completions",
            _body(tool_choice="required", response_format={"type": "json_object"}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            _body(
                tools=[
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                        },
                    }
                ],
                tool_choice="required",
            ),
            "tools",
        ),
        ("/v1/chat/completions", _body(messages=[*USER, {"role": "tool", "content": "3"}]), "messages"),
        (
            "/v1/chat/completions",
            _body(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
            "messages",
        ),
        ("/v1/completions", {"prompt": "x", "tools": TOOLS}, "tools"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(scripted, path, body, param) -> None:
    _, srv, _ = scripted
    assert_openai_error(srv.client.post(path, json=body), 400, param)


# --- The real engine: forced calls on a tiny random model.

MODEL = "tiny-moe-tools"


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory, tokenizer):
    """conftest's tiny model with a 1,024-token context: the tool list alone outgrows 256."""
    import torch

    from moetron.config import get_preset
    from moetron.convert.hf import save_pretrained
    from moetron.model.transformer import Transformer

    directory = tmp_path_factory.mktemp("tiny-moe-tools")
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tokenizer.vocab_size, max_seq_len=1024)
    torch.manual_seed(0)
    save_pretrained(Transformer.from_config(cfg), directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def real(tool_model_dir, serve_in_process):
    from moetron.infer.engine import LLMEngine

    with serve_in_process(LLMEngine.from_pretrained(tool_model_dir), model_name=MODEL) as srv:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
        )


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("tool_choice", "names"), [("required", set(SCHEMAS)), (NAMED, {"get_time"})], ids=["required", "named"]
)
def test_forced_calls_validate_against_the_schema(real, tool_choice, names) -> None:
    """Random weights, sampled at temperature 1: only the grammar makes these valid calls."""
    for seed in range(3):
        response = real.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            seed=seed,
            max_tokens=200,
        )
        content, calls, reason = _answer(response)
        assert content is None and reason == "tool_calls" and len(calls) == 1, response
        ((_, name, arguments),) = calls
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_parallel_forced_calls_are_each_valid(real) -> None:
    response = real.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", seed=1, max_tokens=250
    )
    content, calls, reason = _answer(response)
    assert content is None and calls and reason in ("tool_calls", "length")
    complete = calls if reason == "tool_calls" else calls[:-1]  # the last may be cut off
    for _, name, arguments in complete:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_forced_calls_stream_as_they_answer(real) -> None:
    """Greedy, so both runs make the same call; every token's logprobs arrive, though the text of
    some is held back while it streams."""
    kwargs = {
        "model": MODEL,
        "messages": USER,
        "tools": TOOLS,
        "tool_choice": NAMED,
        "temperature": 0.0,
        "max_tokens": 200,
        "logprobs": True,
    }
    response = real.chat.completions.create(**kwargs)
    content, calls, reason = _answer(response)
    streamed_content, streamed_calls, streamed_reason, chunks = _stream(real, **kwargs)
    assert reason == "tool_calls"
    assert (streamed_content, [c[1:] for c in streamed_calls], streamed_reason) == (
        content,
        [c[1:] for c in calls],
        reason,
    )
    streamed_logprobs = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed_logprobs] == [t.token for t in response.choices[0].logprobs.content]
    assert len(streamed_logprobs) == response.usage.completion_tokens


def test_each_choice_streams_its_own_calls(scripted) -> None:
    engine, _, client = scripted
    engine.reply = REPLY
    chunks = list(client.chat.completions.create(model="fake", messages=USER, tools=TOOLS, n=2, stream=True))
    by_choice: dict[int, list[dict]] = {0: [], 1: []}
    for chunk in chunks:
        by_choice[chunk.choices[0].index].append(chunk.choices[0].delta.model_dump(exclude_none=True))
    (content0, calls0), (content1, calls1) = (_reassemble(by_choice[k]) for k in (0, 1))
    assert content0 == content1 == "Let me check.\n"
    assert [c[1:] for c in calls0] == [c[1:] for c in calls1] and len(calls0) == 2
    assert len({c[0] for c in calls0 + calls1}) == 4  # ids are per call and per choice
