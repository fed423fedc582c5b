"""What the engine hands back each step (the shapes vLLM's users know)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# One generated (or prompt) position: token id → Logprob, holding the chosen token and the top-k.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # cumulative, stop string removed unless include_stop_str_in_output
    token_ids: list[int]  # cumulative
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None  # one per generated token when requested
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic()
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0  # prefix-cache hits


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first position has none
    num_cached_tokens: int = 0

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class EngineStats:
    """A snapshot for /metrics and benchmarks."""

    num_waiting: int
    num_running: int
    num_preempted_total: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached_free: int  # free but holding a reusable prefix
    prefix_cache_hit_tokens_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [moe layer][expert], cumulative
    spec_proposed_tokens_total: int = 0  # speculative decoding: draft tokens checked by the target
    spec_accepted_tokens_total: int = 0  # ... and kept (bonus/recovered tokens not counted)
    weight_bytes: int = 0  # parameters and quantized weights held (an expert-parallel rank: its shard)
    num_forward_steps_total: int = 0  # steps that ran a forward (expert parallelism: on any rank)
    exchange_seconds_total: float = 0.0  # inside the expert exchange's collectives
    # Serving across processes (infer/data_parallel.py): each rank's own; the fields above are sums.
    ranks: list[EngineStats] = field(default_factory=list)

    @property
    def spec_acceptance_rate(self) -> float:
        total = self.spec_proposed_tokens_total
        return self.spec_accepted_tokens_total / total if total else 0.0
