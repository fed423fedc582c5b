"""`moetron serve` as a real process on loopback, driven by the official `openai` client; then
the server's lifecycle (back-pressure, client disconnects, the SIGTERM drain) in process, around the
real engine wrapped in a `GatedEngine`.

One session server (tiny random MoE + a BPE tokenizer, `--api-key` set) serves the protocol tests
(one process start is most of their time); when the session ends it gets SIGTERM, idle, and must
exit with status 0. Logprobs are checked against `transformers`' MixtralForCausalLM on the same
weights (an independent implementation) to 1e-4. The lifecycle tests need a request to stay in
flight while the test acts; the gated engine runs a step only when the test allows it, so that is a
state the test creates, never a race against decoding.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import API_KEY, HANG_GUARD_S, GatedEngine, assert_openai_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetron.infer.engine import LLMEngine
from moetron.serve.metrics import parse_metrics

MODEL = "tiny-moe"
STARTUP_TIMEOUT_S = 90  # a cold process imports torch; on 2 shared cores that alone can take 10 s
LOGPROB_ATOL = 1e-4  # float32, two implementations summing in different orders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m moetron serve` process; its log is printed when a test using it fails."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "moetron", "serve", str(model_dir), "--port", str(self.port), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S  # a hang guard: startup is polled, not timed
        while True:
            assert self.proc.poll() is None, f"server exited at startup:\n{self.log()}"
            assert time.monotonic() < deadline, (
                f"server did not come up in {STARTUP_TIMEOUT_S} s:\n{self.log()}"
            )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=HANG_GUARD_S).text)

    def stop(self) -> int:
        """SIGTERM, as an orchestrator stops it; its exit status (killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(HANG_GUARD_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("log") / "server.log"
    # --max-queued-requests: the CLI takes it (its 429 is tested in process, below).
    args = ("--api-key", API_KEY, "--served-model-name", MODEL, "--max-queued-requests", "8")
    srv = Server(tiny_model_dir, log_path, *args)
    yield srv
    # Every test's responses are complete, so nothing is in flight and the drain that SIGTERM
    # starts ends at once (the lifecycle tests below hold requests in flight through a drain).
    assert srv.stop() == 0, f"the idle server did not exit cleanly on SIGTERM:\n{srv.log()}"
    assert "SIGTERM: draining 0 requests in flight" in srv.log()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S)


def _post(server: Server, path: str, body: bytes | dict, key: str | None = API_KEY) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=HANG_GUARD_S)


# -- protocol -----------------------------------------------------------------------------------


def test_models(client) -> None:
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion(client, server) -> None:
    r = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0
    prompt_tokens = _post(server, "/tokenize", {"prompt": "ROMEO:"}).json()["count"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens,
        7,
        prompt_tokens + 7,
    )
    # The text is the decoding of the generated tokens: re-encoding "ROMEO:" + text round-trips.
    echoed = client.completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=7, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    assert echoed.choices[0].text == "ROMEO:" + choice.text


def test_chat(client, server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 5
    tokenized = _post(server, "/tokenize", {"messages": messages}).json()
    assert r.usage.prompt_tokens == tokenized["count"]
    rendered = _post(server, "/detokenize", {"tokens": tokenized["tokens"]}).json()["prompt"]
    assert rendered.endswith("<|user|>\nWho art thou?<|end|>\n<|assistant|>\n")  # the template's format


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_streaming_with_usage_equals_non_streaming(client, api) -> None:
    common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "n": 2}
    if api == "chat":
        create = client.chat.completions.create
        kwargs = {"messages": [{"role": "user", "content": "Speak."}], "logprobs": True, "top_logprobs": 2}
    else:
        create, kwargs = client.completions.create, {"prompt": "JULIET:", "logprobs": 2}
    full = create(**common, **kwargs)
    chunks = list(create(**common, **kwargs, stream=True, stream_options={"include_usage": True}))
    texts, reasons, logprobs = {0: "", 1: ""}, {}, {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        (c,) = chunk.choices
        texts[c.index] += (c.delta.content or "") if api == "chat" else c.text
        if c.logprobs is not None:  # each token's logprobs arrive once, in order
            logprobs[c.index] += (
                [(t.token, t.logprob) for t in c.logprobs.content]
                if api == "chat"
                else list(
                    zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset, strict=True)
                )
            )
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    for c in full.choices:
        assert texts[c.index] == (c.message.content if api == "chat" else c.text)
        assert reasons[c.index] == c.finish_reason
        expected = (
            [(t.token, t.logprob) for t in c.logprobs.content]
            if api == "chat"
            else list(zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset, strict=True))
        )
        assert logprobs[c.index] == expected and len(expected) == full.usage.completion_tokens // 2


def test_n_and_seed_reproducibility(client) -> None:
    def sample(seed: int, n: int = 3) -> list[str]:
        r = client.completions.create(
            model=MODEL,
            prompt="To be",
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            n=n,
            extra_body={"ignore_eos": True},
        )
        assert sorted(c.index for c in r.choices) == list(range(n))
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first  # same seed, same samples
    assert len(set(first)) == 3  # the n samples of one request differ (random model: ~uniform logits)
    assert sample(4321) != first


def test_stop_strings_logit_bias_and_prompt_batches(client) -> None:
    greedy = {"model": MODEL, "temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(prompt="KING:", **greedy).choices[0].text
    stop = full[8:11]  # stop at a string the greedy text contains
    cut = full[: full.index(stop)]
    stopped = client.completions.create(prompt="KING:", stop=[stop], **greedy).choices[0]
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    streamed = client.completions.create(prompt="KING:", stop=[stop], stream=True, **greedy)
    assert "".join(c.choices[0].text for c in streamed) == cut
    # logit_bias reaches the sampler: +100 on one token makes greedy decoding repeat it.
    token = 300
    biased = client.completions.create(
        model=MODEL,
        prompt="KING:",
        max_tokens=5,
        temperature=0,
        logit_bias={str(token): 100},
        logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    assert biased.choices[0].logprobs.tokens == [f"token_id:{token}"] * 5
    # A batch of prompts: n choices per prompt, indexed prompt-major, each its solo result.
    batch = client.completions.create(prompt=["KING:", "QUEEN:"], n=2, **greedy)
    texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
    queen = client.completions.create(prompt="QUEEN:", **greedy).choices[0].text
    assert texts == [full, full, queen, queen]


def test_logprobs_match_transformers(client, tiny_model_dir) -> None:
    from transformers import MixtralForCausalLM

    prompt = [5, 17, 99, 3]
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        echo=True,  # prompt tokens and their logprobs first (the first has none)
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hark"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy: the chosen is the top-1
    # Independent check: the same weights in transformers score every token the same.
    hf = MixtralForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert tokens[:4] == prompt
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].log_softmax(-1)  # row p scores token p + 1
    for pos in range(1, len(tokens)):
        row, token = ref[pos - 1], tokens[pos]
        if pos >= len(prompt):
            assert token == row.argmax().item()  # greedy
        assert abs(lp.token_logprobs[pos] - row[token].item()) <= LOGPROB_ATOL
        top = {int(t.removeprefix("token_id:")): v for t, v in lp.top_logprobs[pos].items()}
        expected = dict(zip(*(x.tolist() for x in row.topk(3)[::-1]), strict=True))
        assert top.keys() == expected.keys()
        assert all(abs(top[t] - expected[t]) <= LOGPROB_ATOL for t in top)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ', None),  # malformed JSON
        ("/v1/completions", b'"just a string"', None),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 1e9}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_k": -5}, "top_k"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"10": 500}}, "logit_bias"),
        ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "max_tokens",
        ),
        ("/tokenize", {"prompt": "x", "messages": []}, "prompt"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ],
)
def test_400_names_the_param(server, path, body, param) -> None:
    assert_openai_error(_post(server, path, body), 400, param)


def test_400_prompt_over_the_context(client, server) -> None:
    long_prompt = list(range(10, 10 + 300))  # the tiny preset's context is 256
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    message = info.value.body["message"]
    assert "256" in message and "300" in message
    error = assert_openai_error(
        _post(server, "/v1/completions", {"prompt": list(range(10, 250)), "max_tokens": 100}), 400
    )
    assert error["param"] == "max_tokens" and "256" in error["message"]


def test_401_and_404(server) -> None:
    for key in (None, "wrong-key"):
        error = assert_openai_error(_post(server, "/v1/completions", {"prompt": "x"}, key=key), 401, None)
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    error = assert_openai_error(
        _post(server, "/v1/chat/completions", {"model": "gpt-4o", "messages": []}), 404, "model"
    )
    assert error["code"] == "model_not_found"
    assert_openai_error(httpx.get(f"{server.url}/v1/nowhere", timeout=10), 404)


# -- concurrency --------------------------------------------------------------------------------

PROMPTS = [
    "ROMEO:",
    "What light through yonder window",
    "O",
    "Friends, Romans, countrymen, lend me",
    "A",
    "Now is the winter",
]


def test_concurrent_greedy_equals_solo(client) -> None:
    def run(i: int) -> str:
        r = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[i],
            max_tokens=8 + 3 * i,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    solo = [run(i) for i in range(len(PROMPTS))]
    results: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(len(PROMPTS))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(PROMPTS))] == solo


# -- fuzz ---------------------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_plausible = {
    "model": st.sampled_from([MODEL, "other"]),
    "prompt": st.text(max_size=40)
    | st.lists(st.integers(-3, 600), max_size=12)
    | st.lists(st.text(max_size=8), max_size=3),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                "content": st.text(max_size=30),
            }
        ),
        max_size=3,
    ),
    "max_tokens": st.integers(-2, 6),
    "max_completion_tokens": st.integers(-2, 6),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 600),
    "min_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 3),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "seed": st.integers(-(2**65), 2**65),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "logit_bias": st.dictionaries(
        st.text(max_size=4) | st.integers(-5, 700).map(str), st.floats(-200, 200), max_size=3
    ),
    "logprobs": st.integers(-1, 8) | st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=8),
    "tokens": st.lists(st.integers(-3, 10**6), max_size=5),
}
_bodies = st.dictionaries(
    st.sampled_from(sorted(_plausible)) | st.text(max_size=6),
    st.just(None),
    max_size=8,
).flatmap(
    lambda keys: st.fixed_dictionaries(
        {k: (_plausible.get(k, _json) | _json) if k in _plausible else _json for k in keys}
    )
)
FUZZ_EXAMPLES = 100


def _bounded(body: dict) -> dict:
    """Keep valid requests cheap: at most 6 tokens and 3 samples (the context limit has its own test)."""
    for key, cap in (("max_tokens", 6), ("max_completion_tokens", 6), ("n", 3)):
        if type(body.get(key)) is int and body[key] > cap:
            body[key] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return body


def test_fuzz_no_5xx(server) -> None:
    # A fixed number of examples, derandomized: the same requests on every run, however fast the
    # machine (a time budget made the number of requests, and so the test, depend on the machine).
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
        body=_bodies | st.binary(max_size=40),
    )
    def fuzz(path: str, body: dict | bytes) -> None:
        r = _post(server, path, body if isinstance(body, bytes) else _bounded(body))
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)
        elif isinstance(body, dict) and body.get("stream") is True:
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text

    fuzz()
    assert httpx.get(f"{server.url}/health", timeout=HANG_GUARD_S).status_code == 200
    # Every response is complete, so each of its engine requests has finished or had its abort
    # queued; the stats query queues behind those on the engine thread: no waiting needed.
    idle = server.metrics()
    assert idle["moetron_kv_blocks_used"] == 0 and idle["moetron_requests_in_flight"] == 0


# -- lifecycle, in process: the real engine, gated --------------------------------------------------
# Back-pressure, disconnects and the drain all need requests held in flight while the test acts.

STREAM = {
    "model": MODEL,
    "prompt": "ROMEO:",
    "max_tokens": 5,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "extra_body": {"ignore_eos": True},
}


@pytest.fixture
def engine(tiny_model_dir) -> GatedEngine:
    """The real engine on the tiny model, stepping only when the test allows."""
    return GatedEngine(LLMEngine.from_pretrained(tiny_model_dir))


def _openai(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=HANG_GUARD_S
    )


def _read_to_the_end(stream: openai.Stream) -> int:
    """Consume a completion stream; the number of tokens it generated, checking it ran its course."""
    chunks = list(stream)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"], reasons
    return chunks[-1].usage.completion_tokens


def test_queue_full_is_429_until_a_request_finishes(engine, serve_in_process) -> None:
    with serve_in_process(engine, model_name=MODEL, max_queued_requests=2) as srv:
        client = _openai(srv.port)
        streams = [client.completions.create(**STREAM) for _ in range(2)]  # admitted: headers are back
        assert srv.metrics()["moetron_requests_in_flight"] == 2  # and held there: no step has run
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
        engine.open()
        assert [_read_to_the_end(s) for s in streams] == [5, 5]
        # Both responses are complete, so the server holds nothing: there is room again.
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_sigterm_drains_the_requests_in_flight_then_exits(engine, serve_in_process) -> None:
    with serve_in_process(engine, model_name=MODEL) as srv:
        client = _openai(srv.port)
        streams = [client.completions.create(**STREAM) for _ in range(2)]  # held in flight by the gate
        srv.server.handle_exit(signal.SIGTERM, None)  # what the server's SIGTERM handler runs
        assert srv.client.get("/health").status_code == 503  # so a load balancer moves away
        with pytest.raises(openai.InternalServerError) as info:  # 503: new work is refused
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert info.value.status_code == 503 and info.value.body["code"] == "shutting_down"
        assert srv.metrics()["moetron_requests_in_flight"] == 2
        assert not srv.server.drained() and not srv.server.should_exit  # it waits for those two
        engine.open()
        assert [_read_to_the_end(s) for s in streams] == [5, 5]  # which run to their end
        assert srv.server.drained()
        srv.thread.join(HANG_GUARD_S)  # then the server exits by itself
        assert not srv.thread.is_alive()


def test_second_sigterm_stops_at_once(engine, serve_in_process) -> None:
    with serve_in_process(engine, model_name=MODEL) as srv:
        stream = _openai(srv.port).completions.create(**STREAM)  # held in flight by the gate
        srv.server.handle_exit(signal.SIGTERM, None)
        assert not srv.server.should_exit
        srv.server.handle_exit(signal.SIGTERM, None)
        assert srv.server.should_exit  # no waiting for the request in flight
        stream.close()  # so that the server's graceful shutdown need not time out on it


def _send_raw(port: int, path: str, body: dict) -> socket.socket:
    """A request on a socket of the test's own, so that the test decides when the client hangs up."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_kv_blocks(engine, serve_in_process, stream: bool) -> None:
    aborted = 'moetron_requests_finished_total{finish_reason="abort"}'
    with serve_in_process(engine, model_name=MODEL) as srv:
        body = {"model": MODEL, "prompt": "To be", "max_tokens": 200, "ignore_eos": True, "stream": stream}
        with _send_raw(srv.port, "/v1/completions", body) as sock:
            engine.wait_for(lambda: len(engine.added) == 1, "the request to reach the engine")
            engine.allow(2)  # a prefill and a decode step: the request holds KV blocks
            engine.wait_for(lambda: engine.steps == 2, "two engine steps")
            if stream:
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
            busy = srv.metrics()
            assert busy["moetron_requests_in_flight"] == 1 and busy["moetron_num_requests_running"] == 1
            assert busy["moetron_kv_blocks_used"] > 0 and busy["moetron_generation_tokens_total"] == 2
        # The client has hung up, 198 tokens short, and no step has run since: the server must
        # abort the request, which gives its blocks back.
        (request_id,) = engine.added
        engine.wait_for(lambda: request_id in engine.aborted, "the server to abort the request")
        after = srv.metrics()
    assert after["moetron_requests_in_flight"] == 0 and after["moetron_num_requests_running"] == 0
    assert after["moetron_kv_blocks_used"] == 0
    assert after["moetron_kv_blocks_free"] == after["moetron_kv_blocks_total"]
    assert after[aborted] == 1 and after["moetron_generation_tokens_total"] == 2
