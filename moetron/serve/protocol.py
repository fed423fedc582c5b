"""OpenAI request schemas, their validation, and the translation to engine inputs.

Requests are parsed from the raw body in strict mode (no "1" for 1, no true for 1.0, no NaN) with
unknown fields rejected, as OpenAI does. Every failure becomes an `APIError` in OpenAI's error shape;
range checks are the engine's own (`SamplingParams.__post_init__`), so they are written once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moetron.data.tokenizer import Tokenizer
from moetron.infer import structured_output
from moetron.infer.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from moetron.serve import tool_calls

SEED_RANGE = (-(2**63), 2**64 - 1)  # int64 or uint64; the engine mixes the seed's 64 bits
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions; chat allows top_logprobs up to 20


class APIError(Exception):
    """An error to send as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions, accepted by the openai client through extra_body.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    # Structured outputs: OpenAI's response_format, or one of vLLM's guided_* extras.
    response_format: ResponseFormat | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None  # accepted only when equal to n (no server-side reranking)
    suffix: str | None = None  # accepted only when empty (no fill-in-the-middle)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object
    strict: bool | None = None  # accepted; required / named tool_choice always enforce the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # auto with tools
    parallel_tool_calls: bool = True


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    # vLLM's field (lm-eval's remote tokenizer sends false). Off by default, unlike vLLM, because
    # moetron's completions never add special tokens: the count is the one the server will see.
    add_special_tokens: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


Req = TypeVar("Req", bound=BaseModel)


def parse(cls: type[Req], body: bytes) -> Req:
    """Validate a raw JSON body; malformed JSON, wrong types and unknown fields become 400s."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not loc:  # a JSON value that is not an object
            raise APIError(400, "the request body must be a JSON object") from None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument: {'.'.join(loc)}", param=loc[0]) from None
        where = ".".join(loc) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=loc[0] if loc else None) from None


@dataclass
class EngineInput:
    """One engine request: a prompt's ids (and text when it came as text) with its sampling."""

    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    lora: str | None = None  # the served LoRA adapter its `model` names, if any


def check_model(requested: str | None, served: str, adapters: list[str] | tuple[str, ...] = ()) -> str | None:
    """The LoRA adapter `requested` names (None for the base model); 404 for any other name."""
    if requested is None or requested == served:
        return None
    if requested in adapters:
        return requested
    also = f" and the LoRA adapters {', '.join(f'`{a}`' for a in adapters)}" if adapters else ""
    raise APIError(
        404,
        f"the model `{requested}` does not exist; this server serves `{served}`{also}",
        param="model",
        code="model_not_found",
    )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=param
        )


def _check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The max_tokens to use: the request's, or what the context leaves."""
    if num_prompt_tokens == 0:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at least one must be left to generate)",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but {num_prompt_tokens} "
            f"prompt tokens + max_tokens={max_tokens} exceed it",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def _sampling_params(
    req: _SamplingRequest,
    vocab_size: int,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    logit_bias: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: key {key!r} is not a token id", param="logit_bias") from None
        logit_bias[token] = bias
    check_token_ids(list(logit_bias), vocab_size, "logit_bias")
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise APIError(400, f"seed={req.seed} must lie in [-2**63, 2**64 - 1]", param="seed")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    structured = structured_outputs(req)
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else min(req.top_k, vocab_size),  # more than V: all of them
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=logit_bias,
            seed=req.seed,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            structured_outputs=structured,
        )
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=e.param) from None


def structured_outputs(req: _SamplingRequest) -> StructuredOutputs | None:
    """The grammar a request asks for (response_format or a guided_* field), checked by the
    grammar engine so that a schema it cannot compile is a 400 naming the field."""
    given = {
        name: getattr(req, name)
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(req, name) is not None
    }
    if req.response_format is not None and req.response_format.type != "text":
        given = {"response_format": req.response_format, **given}
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give at most one of {', '.join(given)}", param=next(iter(given)))
    ((param, value),) = given.items()
    try:
        if param == "response_format":
            spec = _response_format(value)
        elif param == "guided_json":
            spec = StructuredOutputs(json=value if isinstance(value, str) else json.dumps(value))
        elif param == "guided_regex":
            spec = StructuredOutputs(regex=value)
        elif param == "guided_choice":
            spec = StructuredOutputs(choice=tuple(value))
        else:
            spec = StructuredOutputs(grammar=value)
        structured_output.check(spec)
    except SamplingParamsError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return spec


def _response_format(fmt: ResponseFormat) -> StructuredOutputs:
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise SamplingParamsError("response_format", "json_schema is only allowed with type json_schema")
        return StructuredOutputs(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise SamplingParamsError("response_format", "type json_schema needs json_schema.schema")
    if not tool_calls.NAME_PATTERN.fullmatch(fmt.json_schema.name):  # OpenAI's rule for both names
        raise SamplingParamsError(
            "response_format", "json_schema.name must be 1-64 letters, digits, underscores or dashes"
        )
    return StructuredOutputs(json=json.dumps(fmt.json_schema.schema_))


def completion_inputs(
    req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int, max_model_len: int
) -> list[EngineInput]:
    """One engine input per prompt (a string, a list of ids, or a batch of either)."""
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(
            400, f"best_of={req.best_of} is not supported unless it equals n={req.n}", param="best_of"
        )
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise APIError(
            400, f"logprobs={req.logprobs} must lie in [0, {MAX_COMPLETION_LOGPROBS}]", param="logprobs"
        )
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt
    if not prompt:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    inputs = []
    for one in prompt:
        ids = tokenizer.encode(one) if isinstance(one, str) else list(one)
        check_token_ids(ids, vocab_size, "prompt")
        max_tokens = _check_length(
            len(ids), 16 if req.max_tokens is None else req.max_tokens, max_model_len, "prompt"
        )
        params = _sampling_params(
            req,
            vocab_size,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        inputs.append(EngineInput(ids, one if isinstance(one, str) else None, params))
    return inputs


def render_chat(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text from the tokenizer's chat template (OpenAI's `developer` role is `system`).
    A template that knows nothing of tools gets them, and calls and results, as message text."""
    if not messages:
        raise APIError(400, "messages: at least one message is required", param="messages")
    plain = [_template_message(m, k) for k, m in enumerate(messages)]
    uses_tools = bool(tools) or any(m["role"] == "tool" or "tool_calls" in m for m in plain)
    if uses_tools and not tokenizer.chat_template_knows_tools:
        plain, tools = tool_calls.default_format(plain, tools), None
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tools=tools)
    except Exception as e:  # jinja2's TemplateError and friends: the template refused these messages
        raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None


def _template_message(m: ChatMessage, k: int) -> dict:
    content = m.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    message: dict[str, Any] = {
        "role": "system" if m.role == "developer" else m.role,
        "content": content or "",
    }
    if m.tool_calls is not None and m.role != "assistant":
        raise APIError(400, f"messages[{k}]: only assistant messages carry tool_calls", param="messages")
    if (m.role == "tool") != (m.tool_call_id is not None):
        raise APIError(
            400, f"messages[{k}]: tool messages, and only they, need tool_call_id", param="messages"
        )
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": tool_calls.template_call(c.function.name, c.function.arguments),
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def chat_input(
    req: ChatCompletionRequest, tokenizer: Tokenizer, vocab_size: int, max_model_len: int
) -> EngineInput:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools is not None else None
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    try:
        tool_calls.check_tools(tools, choice)
        grammar = tool_calls.grammar_for(tools, choice, req.parallel_tool_calls)
    except tool_calls.ToolCallError as e:
        raise APIError(400, str(e), param=e.param) from None
    text = render_chat(req.messages, tokenizer, req.add_generation_prompt, tools)
    ids = tokenizer.encode(text)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = _check_length(len(ids), requested, max_model_len, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(req, vocab_size, max_tokens=max_tokens, logprobs=logprobs)
    end_of_turn = tokenizer.end_of_turn_id
    if end_of_turn is not None and end_of_turn < vocab_size and end_of_turn not in params.stop_token_ids:
        params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, end_of_turn])
    if grammar is not None and params.structured_outputs is not None:
        if tool_calls.is_forced(choice):
            raise APIError(
                400,
                "response_format cannot be combined with tool_choice required or a named function",
                param="response_format",
            )
        grammar = None  # "auto" with a response format: the format's grammar; calls are parsed only
    if grammar is not None:
        params = dataclasses.replace(params, structured_outputs=StructuredOutputs(grammar=grammar))
    return EngineInput(ids, text, params)
