"""Serving across processes (infer/data_parallel.py, expert_parallel.py, head_parallel.py) on gloo,
two ranks (four for data × tensor parallelism): the outputs are the one-process engine's, bit for
bit, for every request mix and layout; an idle rank still
serves its experts; a dead worker fails the requests in flight, gets 503s and a non-zero exit; the
SIGTERM drain covers every rank; `moetron serve --data-parallel-size 2 --enable-expert-parallel`
answers the official `openai` client, on one node and as two "nodes" on loopback.

The engines of the first tests run in this process (rank 0) with one spawned worker each, one at a
time (a process has one default process group). Bits are compared exactly: token ids, every
logprob, cumulative logprobs, prompt logprobs, text, and the per-expert token counts summed over
the ranks (where no request was preempted: a preempted request's recompute is counted again, and
which requests a layout preempts is its own).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import API_KEY, HANG_GUARD_S, GatedEngine
from test_serve_server import MODEL, STARTUP_TIMEOUT_S, STREAM, Server, _free_port, _openai

from moetron.infer.engine import LLMEngine
from moetron.infer.llm import LLM
from moetron.infer.sampling_params import SamplingParams, StructuredOutputs

pytestmark = pytest.mark.distributed
EP2 = {"data_parallel_size": 2, "enable_expert_parallel": True}
PROMPTS = ["ROMEO:", "JULIET: O Romeo", "To be, or not to be", "First Citizen:"]


@contextlib.contextmanager
def engines(model_dir: Path, **settings: Any) -> Iterator[tuple[LLMEngine, Any]]:
    """The one-process engine and a several-rank one (two ranks, expert-parallel, unless `settings`
    name a layout) with the same settings; the ranks are stopped afterwards."""
    layout = {
        k: settings.pop(k)
        for k in list(settings)
        if k in ("data_parallel_size", "tensor_parallel_size", "enable_expert_parallel")
    }
    one = LLMEngine.from_pretrained(model_dir, **settings)
    two = LLMEngine.from_pretrained(model_dir, **settings, **(layout or EP2))
    try:
        yield one, two
    finally:
        two.shutdown()
    assert all(p.exitcode == 0 for p in two.workers), [p.exitcode for p in two.workers]


def assert_same_outputs(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.prompt_token_ids == y.prompt_token_ids and x.prompt_logprobs == y.prompt_logprobs
        for u, v in zip(x.outputs, y.outputs, strict=True):
            assert u.token_ids == v.token_ids, (x.request_id, u.token_ids, v.token_ids)
            assert u.logprobs == v.logprobs and u.cumulative_logprob == v.cumulative_logprob
            assert (u.text, u.finish_reason) == (v.text, v.finish_reason)


def ranks_that_generated(engine: Any) -> list[int]:
    return [r for r, s in enumerate(engine.get_stats().ranks) if s.generation_tokens_total > 0]


JSON_OUTPUT = StructuredOutputs(
    json='{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
)
REGEX_OUTPUT = StructuredOutputs(regex="[a-z]{3,60}")


def test_parity_under_preemption_chunked_prefill_sampling_and_n(tiny_model_dir, tokenizer) -> None:
    # 12 blocks of 16 per rank: 8 requests of ~90 tokens (6 blocks each) cannot all fit, on one
    # process or on a rank holding half of them, so both preempt; prompts over 32 tokens prefill in chunks.
    settings = {"num_kv_blocks": 12, "max_num_batched_tokens": 32, "max_model_len": 128}
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    prompts = [tokenizer.encode(text[: 20 + 9 * i]) for i in range(8)]
    params = [
        SamplingParams(max_tokens=60, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=50, temperature=0.8, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=1.0, seed=2, n=2, logprobs=1, ignore_eos=True),
        SamplingParams(max_tokens=55, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=45, temperature=0, ignore_eos=True, structured_outputs=JSON_OUTPUT),
        SamplingParams(max_tokens=60, temperature=1.2, top_k=20, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, logprobs=2),
        SamplingParams(
            max_tokens=50, temperature=0.9, seed=5, ignore_eos=True, structured_outputs=REGEX_OUTPUT
        ),
    ]  # two grammar-constrained: each rank compiles the request's grammar itself
    with engines(tiny_model_dir, **settings) as (one, two):
        expected = LLM(one).generate(prompts, params)
        got = LLM(two).generate(prompts, params)
        assert_same_outputs(expected, got)
        assert re.fullmatch("[a-z]{3,50}", got[7].outputs[0].text)  # the grammar held on its rank
        assert got[4].outputs[0].text.startswith('{"a":')
        assert one.get_stats().num_preempted_total > 0
        stats = two.get_stats()
        assert all(s.num_preempted_total > 0 for s in stats.ranks), [
            s.num_preempted_total for s in stats.ranks
        ]
        assert ranks_that_generated(two) == [0, 1]
        # Each rank holds 2 of the 4 experts: less than the whole model, and the same amount.
        whole = one.get_stats().weight_bytes
        assert stats.ranks[0].weight_bytes == stats.ranks[1].weight_bytes < whole


def test_idle_rank_prefix_hits_and_expert_counts(tiny_model_dir, tokenizer) -> None:
    shared = tokenizer.encode(
        "JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name;"
    )
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    with engines(tiny_model_dir, num_kv_blocks=64) as (one, two):
        # One request: rank 1 runs nothing, yet serves its two experts to rank 0 every layer.
        assert_same_outputs(LLM(one).generate([shared], params), LLM(two).generate([shared], params))
        idle = two.get_stats().ranks[1]
        assert idle.generation_tokens_total == 0 and idle.exchange_seconds_total > 0
        assert not any(any(layer) for layer in idle.tokens_per_expert)
        # Per-expert counts: every token routed as on one process (while no layout-dependent
        # prefix hit or preemption changes which tokens are computed at all).
        distinct = [tokenizer.encode(p) for p in PROMPTS]
        assert_same_outputs(LLM(one).generate(distinct, params), LLM(two).generate(distinct, params))
        assert two.get_stats().tokens_per_expert == one.get_stats().tokens_per_expert
        assert ranks_that_generated(two) == [0, 1]
        # Shared prefixes: the second round's prompts hit the cache on whichever rank holds them.
        batch = [shared + tokenizer.encode(tail) for tail in (" a", " b", " c", " d")]
        for _ in range(2):
            assert_same_outputs(LLM(one).generate(batch, params), LLM(two).generate(batch, params))
        assert all(s.prefix_cache_hit_tokens_total > 0 for s in two.get_stats().ranks)


def test_speculative_decoding_and_replicated_experts(tiny_model_dir, tokenizer) -> None:
    prompts = [
        tokenizer.encode("to be or not to be, to be or not to be, that is"),
        tokenizer.encode("ROMEO:"),
    ]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=1, ignore_eos=True)
    spec = {"num_kv_blocks": 64, "speculative_method": "ngram", "num_speculative_tokens": 3}
    with engines(tiny_model_dir, **spec) as (one, two):
        assert_same_outputs(LLM(one).generate(prompts, params), LLM(two).generate(prompts, params))
        assert two.get_stats().spec_proposed_tokens_total == one.get_stats().spec_proposed_tokens_total > 0
    # Data parallel without expert parallelism: every rank holds the whole model.
    one = LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64)
    two = LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, data_parallel_size=2)
    try:
        assert_same_outputs(LLM(one).generate(prompts, params), LLM(two).generate(prompts, params))
        assert [s.weight_bytes for s in two.get_stats().ranks] == [one.get_stats().weight_bytes] * 2
    finally:
        two.shutdown()


def test_quantized_experts_and_a_bf16_cache(tiny_model_dir, tokenizer) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=9, logprobs=2, ignore_eos=True)
    with engines(tiny_model_dir, num_kv_blocks=64, quantization="q8_0", kv_cache_dtype="bfloat16") as (
        one,
        two,
    ):
        assert_same_outputs(LLM(one).generate(prompts, params), LLM(two).generate(prompts, params))
        assert two.get_stats().tokens_per_expert == one.get_stats().tokens_per_expert


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, **EP2}])
def test_tensor_parallel_heads(tiny_model_dir, tokenizer, layout: dict) -> None:
    """Each group's two ranks split the attention heads and the KV cache (and, 2 × 2, the groups
    split the experts): still one process's bits."""
    settings = {"num_kv_blocks": 16, "max_num_batched_tokens": 32}
    prompts = [tokenizer.encode(p * 3) for p in PROMPTS]
    params = [
        SamplingParams(max_tokens=20, temperature=0, logprobs=2, prompt_logprobs=1, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, seed=5, n=2, ignore_eos=True),
    ] * 2
    with engines(tiny_model_dir, **settings, **layout) as (one, two):
        assert_same_outputs(LLM(one).generate(prompts, params), LLM(two).generate(prompts, params))
        assert two.get_stats().tokens_per_expert == one.get_stats().tokens_per_expert
        # Unseeded sampling: the group's ranks are given one seed, so they stay in lockstep.
        [unseeded] = LLM(two).generate(
            [prompts[0]], SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
        )
        assert len(unseeded.outputs[0].token_ids) == 8
        assert two.local.runner.k_caches[0].shape[2] == 1  # one of the model's two KV heads
        ranks = two.get_stats().ranks
        assert len(ranks) == 2 * layout.get("data_parallel_size", 1)
        assert all(s.weight_bytes < one.get_stats().weight_bytes for s in ranks)


# -- lifecycle, in process: a two-rank engine behind the server, gated --------------------------------


def test_sigterm_drains_every_rank(tiny_model_dir, serve_in_process) -> None:
    engine = GatedEngine(LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, **EP2))
    with serve_in_process(engine, model_name=MODEL) as srv:
        client = _openai(srv.port)
        streams = [client.completions.create(**STREAM) for _ in range(2)]  # one on each rank
        engine.wait_for(lambda: len(engine.added) == 2, "both requests")
        srv.server.handle_exit(signal.SIGTERM, None)
        with pytest.raises(openai.InternalServerError):  # 503: new work is refused
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        engine.open()
        assert [list(s)[-1].usage.completion_tokens for s in streams] == [5, 5]  # both ran to their end
        srv.thread.join(HANG_GUARD_S)
        assert not srv.thread.is_alive() and srv.server.exit_code == 0
    assert ranks_that_generated(engine.engine) == [0, 1]
    assert [p.exitcode for p in engine.engine.workers] == [0]  # stopped by rank 0, not killed


def test_a_dead_worker_fails_requests_answers_503_and_exits_1(tiny_model_dir, serve_in_process) -> None:
    engine = GatedEngine(LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64, **EP2))
    with serve_in_process(engine, model_name=MODEL) as srv:
        client = _openai(srv.port)
        streams = [client.completions.create(**STREAM) for _ in range(2)]
        engine.wait_for(lambda: len(engine.added) == 2, "both requests")
        engine.engine.workers[0].kill()
        engine.workers[0].join(HANG_GUARD_S)
        engine.open()
        for stream in streams:  # the requests in flight end with an error, not a hang
            with pytest.raises(openai.APIError) as info:
                list(stream)
            assert "moetron-rank1" in str(info.value)  # which rank died
        r = srv.client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503, r.text
        srv.thread.join(HANG_GUARD_S)  # the server exits by itself, status 1
        assert not srv.thread.is_alive() and srv.server.exit_code == 1


# -- `moetron serve` processes ----------------------------------------------------------------------


def _worker_pids(pid: int) -> list[int]:
    """The spawned serving ranks among `pid`'s children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


def _complete(client: openai.OpenAI, prompt: str, max_tokens: int) -> Any:
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )


def test_moetron_serve_two_ranks_with_the_openai_client(tiny_model_dir, tokenizer, tmp_path) -> None:
    server = Server(
        tiny_model_dir, tmp_path / "server.log", "--api-key", API_KEY, "--served-model-name", MODEL,
        "--data-parallel-size", "2", "--enable-expert-parallel", "--num-kv-blocks", "64",
    )  # fmt: skip
    try:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
        )
        results: dict[int, Any] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(i, _complete(client, PROMPTS[i], 6 + 2 * i))
            )
            for i in range(len(PROMPTS))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD_S)
        one = LLMEngine.from_pretrained(tiny_model_dir, num_kv_blocks=64)
        for i, prompt in enumerate(PROMPTS):
            params = SamplingParams(max_tokens=6 + 2 * i, temperature=0, logprobs=2, ignore_eos=True)
            [expected] = LLM(one).generate([tokenizer.encode(prompt)], [params])
            got = results[i].choices[0]
            assert got.text == expected.outputs[0].text
            chosen = [
                lp[t].logprob
                for lp, t in zip(expected.outputs[0].logprobs, expected.outputs[0].token_ids, strict=True)
            ]
            assert got.logprobs.token_logprobs == chosen  # the same floats, not just close
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].message.content is not None
        stream = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in stream) == results[0].choices[0].text
        metrics = server.metrics()
        for rank in (0, 1):
            assert metrics[f'moetron_rank_weight_bytes{{rank="{rank}"}}'] > 0
            assert metrics[f'moetron_rank_generation_tokens_total{{rank="{rank}"}}'] > 0
        assert metrics["moetron_expert_exchange_seconds_total"] > 0
        [worker] = _worker_pids(server.proc.pid)
    finally:
        status = server.stop()
    assert status == 0, server.log()
    assert (
        not Path(f"/proc/{worker}").exists()
        or b"zombie" in Path(f"/proc/{worker}/status").read_bytes().lower()
    )


def test_moetron_serve_exits_1_when_a_worker_is_killed(tiny_model_dir, tmp_path) -> None:
    server = Server(
        tiny_model_dir, tmp_path / "server.log", "--api-key", API_KEY, "--served-model-name", MODEL,
        "--data-parallel-size", "2", "--enable-expert-parallel",
    )  # fmt: skip
    [worker] = _worker_pids(server.proc.pid)
    subprocess.run(["kill", "-9", str(worker)], check=True)
    deadline = time.monotonic() + HANG_GUARD_S
    while httpx.get(f"{server.url}/health", timeout=HANG_GUARD_S).status_code != 503:
        assert time.monotonic() < deadline, "the server never noticed its dead worker"
        time.sleep(0.05)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=HANG_GUARD_S,
    )
    assert r.status_code == 503 and r.json()["error"]["message"], r.text
    assert server.proc.wait(HANG_GUARD_S) == 1
    assert f"moetron-rank1 (pid {worker}) died" in server.log()


def test_two_nodes_on_loopback(tiny_model_dir, tmp_path) -> None:
    """Each "node" runs the same command with its --node-rank; node 0 serves HTTP."""
    master = str(_free_port())
    common = [
        "--data-parallel-size",
        "2",
        "--enable-expert-parallel",
        "--nnodes",
        "2",
        "--master-port",
        master,
    ]
    node1_log = tmp_path / "node1.log"
    node1 = subprocess.Popen(
        [sys.executable, "-m", "moetron", "serve", str(tiny_model_dir), *common, "--node-rank", "1"],
        stdout=node1_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        server = Server(
            tiny_model_dir,
            tmp_path / "node0.log",
            "--api-key",
            API_KEY,
            "--served-model-name",
            MODEL,
            *common,
        )
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
        )
        outs = [_complete(client, p, 4) for p in PROMPTS[:2]]
        assert all(o.usage.completion_tokens == 4 for o in outs)
        assert server.stop() == 0, server.log()
        assert node1.wait(STARTUP_TIMEOUT_S) == 0, node1_log.read_text()
    finally:
        if node1.poll() is None:
            node1.kill()


def test_torchrun_ranks_serve_and_drain(tiny_model_dir, tmp_path) -> None:
    """Under torchrun every process is a rank: rank 0 serves HTTP, rank 1 serves its experts; the
    SIGTERM torchrun forwards to both drains rank 0, which then stops rank 1."""
    port, log = _free_port(), tmp_path / "torchrun.log"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moetron",
         "serve", str(tiny_model_dir), "--port", str(port), "--data-parallel-size", "2",
         "--enable-expert-parallel", "--served-model-name", MODEL, "--api-key", API_KEY],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
        )
        assert _complete(client, PROMPTS[0], 4).usage.completion_tokens == 4
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(HANG_GUARD_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert "SIGTERM: draining" in text and "rank 1 stopped" in text, text
