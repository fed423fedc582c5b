"""Structured outputs through the server, driven by the official `openai` client: response_format
json_schema / json_object on chat and completions, vLLM's guided_* extras, streaming, and the 400s
a bad request gets (naming the field, never a 5xx)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from conftest import API_KEY, assert_openai_error

from moetron.infer.engine import LLMEngine

MODEL = "tiny-moe"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, serve_in_process):
    engine = LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=400, block_size=8)
    with serve_in_process(engine, model_name=MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chat_json_schema_validates(client, seed) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=JSON_SCHEMA_FORMAT, max_tokens=150, seed=seed
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_json_schema_and_guided_extras(client) -> None:
    r = client.completions.create(
        model=MODEL,
        prompt="ROMEO:",
        max_tokens=150,
        seed=3,
        n=2,
        extra_body={"response_format": JSON_SCHEMA_FORMAT},
    )
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    r = client.completions.create(
        model=MODEL, prompt="Yes or no?", max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(
        model=MODEL,
        prompt="A date:",
        max_tokens=20,
        extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
    )
    assert len(r.choices[0].text) == 10 and r.choices[0].text.startswith("20")
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=150, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_json_object_is_an_object_or_cut_by_length(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=120, seed=5
    )
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # a random model may nest deeper than max_tokens
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_streamed_json_equals_the_full_response(client) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, response_format=JSON_SCHEMA_FORMAT, max_tokens=150, seed=9)
    full = client.chat.completions.create(**kwargs).choices[0]
    text, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == full.message.content and finish == full.finish_reason == "stop"


def test_type_text_is_unconstrained(client) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    text = (
        client.chat.completions.create(**kwargs, response_format={"type": "text"}).choices[0].message.content
    )
    assert plain == text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
        ),
        ({"response_format": "json"}, "response_format"),
        ({"guided_regex": "a("}, "guided_regex"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format"),
    ],
)
def test_bad_structured_output_requests_are_400_naming_the_field(server, extra, param) -> None:
    for path, body in (
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5}),
    ):
        r = server.client.post(path, json={**body, **extra})
        assert_openai_error(r, 400, param)
    assert server.client.get("/health").status_code == 200


def test_a_chat_reply_ends_at_the_end_of_turn_token(client, tokenizer) -> None:
    """The chat format's <|end|> closes the reply (finish "stop"), as EOS does; completions do
    not stop there unless a finished grammar allows it."""
    end = tokenizer.end_of_turn_id
    assert end is not None and end != tokenizer.eos_id
    bias = {str(end): 100}  # the model's first choice becomes <|end|>
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, logit_bias=bias)
    assert (r.choices[0].finish_reason, r.choices[0].message.content, r.usage.completion_tokens) == (
        "stop",
        "",
        1,
    )
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, logit_bias=bias)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)
    # A grammar that is complete may end with <|end|>: "a+" takes one or more a's, then stops there.
    r = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=20, logit_bias=bias, extra_body={"guided_regex": "a+"}
    )
    assert r.choices[0].finish_reason == "stop" and re.fullmatch("a+", r.choices[0].text)
    assert r.usage.completion_tokens <= 3
