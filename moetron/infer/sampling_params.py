"""Per-request sampling parameters (the vLLM / OpenAI set), validated once with field-naming errors."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the offending field (for the API's error body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(param, message)


@dataclass(frozen=True)
class StructuredOutputs:
    """A grammar every sampled token of a sequence must follow (vLLM's StructuredOutputsParams):
    exactly one of `json` (a JSON schema, serialized), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings) or `grammar` (Lark in llguidance's dialect, or GBNF). Plain
    strings, so requests cross process boundaries as they are; each engine compiles them
    (infer/structured_output.py). JSON is compact unless `whitespace_flexible`: a weak model given
    free whitespace pads with indentation until max_tokens."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None]
        given += [self.choice is not None, self.grammar is not None]
        _require(
            sum(given) == 1,
            "structured_outputs",
            "structured outputs need exactly one of json, json_object, regex, choice, grammar",
        )
        _require(
            self.choice is None or (len(self.choice) > 0 and all(isinstance(c, str) for c in self.choice)),
            "structured_outputs",
            "choice must be a non-empty list of strings",
        )


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from tokens present in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None  # per-request generator: same seed, same output, whatever the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k ≥ 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # same, for the prompt tokens (echo + logprobs)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # constrain every token to a grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(isinstance(self.n, int) and 1 <= self.n <= 128, "n", f"n={self.n} must lie in [1, 128]")
        _require(
            0.0 <= self.temperature <= 100.0,
            "temperature",
            f"temperature={self.temperature} must lie in [0, 100]",
        )
        _require(0.0 < self.top_p <= 1.0, "top_p", f"top_p={self.top_p} must lie in (0, 1]")
        _require(self.top_k >= -1, "top_k", f"top_k={self.top_k} must be -1, 0 (disabled) or positive")
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"min_p={self.min_p} must lie in [0, 1]")
        _require(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            f"repetition_penalty={self.repetition_penalty} must lie in (0, 10]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2.0 <= value <= 2.0, name, f"{name}={value} must lie in [-2, 2]")
        for token, bias in self.logit_bias.items():
            _require(
                isinstance(token, int) and token >= 0 and -100.0 <= bias <= 100.0,
                "logit_bias",
                f"logit_bias {{{token}: {bias}}} needs a token id >= 0 and a bias in [-100, 100]",
            )
        _require(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"max_tokens={self.max_tokens} must be >= 1",
        )
        _require(
            self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
            "min_tokens",
            f"min_tokens={self.min_tokens} must lie in [0, max_tokens={self.max_tokens}]",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or 0 <= value <= 20, name, f"{name}={value} must lie in [0, 20]")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _require(len(self.stop) <= 16, "stop", f"at most 16 stop strings, got {len(self.stop)}")
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "stop_token_ids must be non-negative integers",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
