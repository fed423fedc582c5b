"""Prometheus text exposition (format 0.0.4) for the server: counters, gauges, histograms.

Written out rather than taken from prometheus_client: a few dozen lines, no global registry, and
the engine's own figures (KV blocks, per-expert tokens) are read fresh at scrape time.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable

from moetron.infer.outputs import EngineStats

PREFIX = "moetron_"
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in pairs
    )
    return "{" + ",".join(escaped) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {cumulative}"]
        return out


class ServerMetrics:
    """What the HTTP layer counts; the engine's own figures come in through `render(stats)`."""

    def __init__(self) -> None:
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.in_flight = 0

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def count_finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.finished[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def render(self, stats: EngineStats | None) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[tuple, float]]) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(f"{PREFIX}{name}{_labels(labels)} {_number(v)}" for labels, v in samples)

        family(
            "http_requests_total",
            "counter",
            "HTTP requests by endpoint and status code.",
            list(self.requests.items()),
        )
        family(
            "requests_finished_total",
            "counter",
            "Generation requests by finish reason (abort: the client went away).",
            [((("finish_reason", r),), n) for r, n in sorted(self.finished.items())],
        )
        family("requests_in_flight", "gauge", "Generation requests the server holds.", [((), self.in_flight)])
        family(
            "request_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished requests.",
            [((), self.prompt_tokens)],
        )
        family(
            "request_generation_tokens_total",
            "counter",
            "Tokens generated for finished requests.",
            [((), self.completion_tokens)],
        )
        for name, hist, help in (
            ("time_to_first_token_seconds", self.ttft, "Request arrival to first generated token."),
            ("time_per_output_token_seconds", self.tpot, "Mean time between a request's generated tokens."),
            ("e2e_request_latency_seconds", self.e2e, "Request arrival to its last token."),
        ):
            lines += [f"# HELP {PREFIX}{name} {help}", f"# TYPE {PREFIX}{name} histogram"]
            lines += hist.lines(PREFIX + name)
        if stats is not None:
            family(
                "num_requests_waiting", "gauge", "Requests queued in the engine.", [((), stats.num_waiting)]
            )
            family(
                "num_requests_running", "gauge", "Requests in the running batch.", [((), stats.num_running)]
            )
            family(
                "num_preemptions_total",
                "counter",
                "Requests preempted for KV space.",
                [((), stats.num_preempted_total)],
            )
            family("kv_blocks_total", "gauge", "KV-cache blocks in the pool.", [((), stats.kv_blocks_total)])
            family(
                "kv_blocks_used", "gauge", "KV-cache blocks held by requests.", [((), stats.kv_blocks_used)]
            )
            family(
                "kv_blocks_free",
                "gauge",
                "KV-cache blocks not held by any request (cached prefixes included).",
                [((), stats.kv_blocks_total - stats.kv_blocks_used)],
            )
            family(
                "kv_blocks_cached_free",
                "gauge",
                "Free blocks still holding a reusable prefix.",
                [((), stats.kv_blocks_cached_free)],
            )
            family(
                "prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                [((), stats.prefix_cache_hit_tokens_total)],
            )
            family(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens the engine processed.",
                [((), stats.prompt_tokens_total)],
            )
            family(
                "generation_tokens_total",
                "counter",
                "Tokens the engine generated.",
                [((), stats.generation_tokens_total)],
            )
            family(
                "expert_tokens_total",
                "counter",
                "Tokens routed to each expert of each MoE layer.",
                [
                    ((("layer", str(layer)), ("expert", str(expert))), count)
                    for layer, counts in enumerate(stats.tokens_per_expert)
                    for expert, count in enumerate(counts)
                ],
            )
            family(
                "weight_bytes",
                "gauge",
                "Bytes of model weights held (all ranks).",
                [((), stats.weight_bytes)],
            )
            family(
                "forward_steps_total",
                "counter",
                "Engine steps that ran a forward.",
                [((), stats.num_forward_steps_total)],
            )
            family(
                "expert_exchange_seconds_total",
                "counter",
                "Seconds inside expert parallelism's collectives (all ranks; / forward_steps_total / ranks: per step).",
                [((), stats.exchange_seconds_total)],
            )
            if stats.ranks:
                self._render_ranks(stats.ranks, family)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _render_ranks(ranks: list[EngineStats], family: Callable[..., None]) -> None:
        """Each serving rank's own series (infer/data_parallel.py), labelled rank="r"."""

        def per_rank(name: str, kind: str, help: str, value: Callable[[EngineStats], float]) -> None:
            family(name, kind, help, [((("rank", str(r)),), value(s)) for r, s in enumerate(ranks)])

        per_rank(
            "rank_requests_running", "gauge", "Requests in a rank's running batch.", lambda s: s.num_running
        )
        per_rank("rank_requests_waiting", "gauge", "Requests queued on a rank.", lambda s: s.num_waiting)
        per_rank("rank_kv_blocks_total", "gauge", "A rank's KV-cache blocks.", lambda s: s.kv_blocks_total)
        per_rank("rank_kv_blocks_used", "gauge", "A rank's KV-cache blocks held.", lambda s: s.kv_blocks_used)
        per_rank(
            "rank_weight_bytes", "gauge", "Bytes of model weights a rank holds.", lambda s: s.weight_bytes
        )
        per_rank(
            "rank_generation_tokens_total",
            "counter",
            "Tokens a rank generated.",
            lambda s: s.generation_tokens_total,
        )
        per_rank(
            "rank_expert_exchange_seconds_total",
            "counter",
            "Seconds a rank spent inside the expert exchange's collectives.",
            lambda s: s.exchange_seconds_total,
        )
        family(
            "rank_expert_tokens_total",
            "counter",
            "Tokens of a rank's requests routed to each expert of each MoE layer.",
            [
                ((("rank", str(r)), ("layer", str(layer)), ("expert", str(expert))), count)
                for r, s in enumerate(ranks)
                for layer, counts in enumerate(s.tokens_per_expert)
                for expert, count in enumerate(counts)
            ],
        )


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample in a Prometheus text body (tests and benchmarks)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
