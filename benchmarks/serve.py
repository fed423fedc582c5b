"""Serving benchmark: `moetron serve` on loopback, N concurrent streaming clients.

    python -m benchmarks.serve                        # tiny random MoE built into a temp dir
    python -m benchmarks.serve --model-dir runs/demo/final --concurrency 8 --requests 64

Each client sends streaming /v1/completions requests (ignore_eos, so every request generates
exactly --max-tokens) until --requests have been sent in all or --time-limit passes. Reported:
TTFT (send to first token), TPOT (per request: (last - first token) / (tokens - 1)), ITL (every gap
between consecutive token events), p50/p99 each; request and output-token throughput over the run.
Checks, which set the exit status: no request failed, every request got its tokens, and /metrics
shows every KV block free once the load has stopped. Loopback only; the server is started and
stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def build_random_model_dir(directory: Path, preset: str, seed: int = 0) -> Path:
    """A random-weight model of `preset` + a byte-level BPE trained on ~50 KB of Shakespeare."""
    import torch

    from moetron.config import get_preset
    from moetron.convert.hf import save_pretrained
    from moetron.data.shakespeare import documents
    from moetron.data.tokenizer import train_bpe
    from moetron.model.transformer import Transformer

    tokenizer = train_bpe([documents()[0][:50_000]], vocab_size=min(get_preset(preset).vocab_size, 1024))
    cfg = dataclasses.replace(get_preset(preset), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    save_pretrained(Transformer.from_config(cfg), directory)
    tokenizer.save(directory)
    return directory


def _prompts(count: int, words: int) -> list[str]:
    from moetron.data.shakespeare import documents

    text = documents()[1].split()
    return [" ".join(text[i * 7 : i * 7 + words]) for i in range(count)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Result:
    ok: bool
    error: str = ""
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0


async def _one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    times: list[float] = []
    completion_tokens = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, f"stream error: {event['error']['message']}")
                if event.get("usage"):
                    completion_tokens = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["text"]:
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return Result(False, f"{type(e).__name__}: {e}")
    if not times:
        return Result(False, "no tokens streamed")
    return Result(True, ttft=times[0] - start, token_times=times, completion_tokens=completion_tokens)


async def _load(base: str, prompts: list[str], args: argparse.Namespace) -> tuple[list[Result], float]:
    results: list[Result] = []
    next_request = 0
    deadline = time.perf_counter() + args.time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < args.requests and time.perf_counter() < deadline:
            i, next_request = next_request, next_request + 1
            body = {
                "prompt": prompts[i % len(prompts)],
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            results.append(await _one_request(client, f"{base}/v1/completions", body))

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.time_limit + 60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))
        return results, time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(base: str) -> dict[str, float]:
    from moetron.serve.metrics import parse_metrics

    return parse_metrics(httpx.get(f"{base}/metrics", timeout=60).text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="a model directory (default: build a random one)")
    parser.add_argument(
        "--preset", default="tiny", help="preset of the random model when --model-dir is absent"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests in all")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="stop sending after this many seconds"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or build_random_model_dir(Path(tmp) / f"random-{args.preset}", args.preset)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ) | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
        log_path = Path(tmp) / "server.log"
        cmd = [
            sys.executable,
            "-m",
            "moetron",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        started = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if server.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            startup = time.perf_counter() - started
            print(
                f"server up in {startup:.1f} s: {model_dir} on {base}; load average {os.getloadavg()[0]:.1f}"
            )
            results, wall = asyncio.run(_load(base, _prompts(64, args.prompt_words), args))
            deadline = time.monotonic() + 30
            metrics = _metrics(base)
            while metrics["moetron_kv_blocks_used"] != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                metrics = _metrics(base)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()

    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [
        (r.token_times[-1] - r.token_times[0]) / (r.completion_tokens - 1)
        for r in ok
        if r.completion_tokens > 1
    ]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    tokens = sum(r.completion_tokens for r in ok)
    short = [r for r in ok if r.completion_tokens != args.max_tokens]
    print(
        f"{len(results)} requests ({args.concurrency} concurrent, {args.max_tokens} tokens each) in {wall:.1f} s: "
        f"{len(ok) / wall:.2f} req/s, {tokens / wall:.1f} output tok/s"
    )
    print(f"{'metric':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        mean = statistics.fmean(values) if values else float("nan")
        print(
            f"{name:<10}{_percentile(values, 0.5) * 1e3:>10.1f}{_percentile(values, 0.99) * 1e3:>10.1f}{mean * 1e3:>10.1f}"
        )
    kv_used, kv_total = metrics["moetron_kv_blocks_used"], metrics["moetron_kv_blocks_total"]
    print(
        f"errors: {len(errors)}; short requests: {len(short)}; KV blocks used at the end: {kv_used:.0f} / {kv_total:.0f}"
    )
    for e in errors[:5]:
        print("  ", e)
    return 0 if not errors and not short and kv_used == 0 and results else 1


if __name__ == "__main__":
    sys.exit(main())
