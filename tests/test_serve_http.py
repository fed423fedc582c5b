"""HTTP-layer unit tests against a tiny fake engine (moetron's server in process, on loopback).

The fake engine follows the engine contract (cumulative outputs, stop strings via the real
StopChecker, abort, stats) with a scripted next token, so the protocol, streaming and error paths
are checked here without a model; tests/test_serve_server.py runs the real engine.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import GatedEngine, assert_openai_error

from moetron.infer.detokenizer import IncrementalDetokenizer, StopChecker
from moetron.infer.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from moetron.infer.sampling_params import SamplingParams

MAX_MODEL_LEN = 64


class FakeEngine:
    """Next token = the (i + step)-th token of a fixed script; one token per request per step."""

    def __init__(self, tokenizer, script: list[int], fail_after: int | None = None) -> None:
        self.tokenizer, self.script = tokenizer, script
        self.max_model_len, self.vocab_size = MAX_MODEL_LEN, tokenizer.vocab_size
        self.requests: dict[str, dict] = {}
        self.blocks_used = 0
        self.fail_after = fail_after  # raise in step() once a request has this many tokens

    def add_request(self, prompt_token_ids, params: SamplingParams, request_id=None, prompt=None):
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens exceeds max_model_len={self.max_model_len}"
            )
        samples = [
            {
                "ids": [],
                "detok": IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
                "stop": StopChecker(params, self.tokenizer.eos_id),
                "text": "",
                "finish": None,
                "logprobs": [] if params.logprobs is not None else None,
            }
            for _ in range(params.n)
        ]
        self.requests[request_id] = {
            "prompt": prompt_token_ids,
            "params": params,
            "samples": samples,
            "text": prompt,
        }
        self.blocks_used += 1
        return request_id

    def _next_token(self, req: dict, i: int, sample: dict) -> int:
        return self.script[(i + len(sample["ids"]) + len(req["prompt"])) % len(self.script)]

    def abort(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.blocks_used -= 1

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        if self.fail_after is not None and any(
            len(r["samples"][0]["ids"]) >= self.fail_after for r in self.requests.values()
        ):
            raise RuntimeError("simulated engine failure")
        outputs = []
        for rid, req in list(self.requests.items()):
            for i, s in enumerate(req["samples"]):
                if s["finish"]:
                    continue
                token = self._next_token(req, i, s)
                s["ids"].append(token)
                if token != self.tokenizer.eos_id:
                    s["detok"].add(token)
                if s["logprobs"] is not None:
                    # runner-up: an ASCII letter, so its text differs from the chosen token's
                    other = ord("z") - 33 + 7 if token != ord("z") - 33 + 7 else ord("y") - 33 + 7
                    top = {token: Logprob(-0.5, 1), other: Logprob(-1.5, 2), 1: Logprob(float("-inf"), 3)}
                    s["logprobs"].append(top)
                finish, _, s["text"] = s["stop"].check(s["ids"], s["detok"].text)
                s["finish"] = finish
            done = all(s["finish"] for s in req["samples"])
            outputs.append(
                RequestOutput(
                    request_id=rid,
                    prompt=req["text"],
                    prompt_token_ids=req["prompt"],
                    outputs=[
                        CompletionOutput(
                            i, s["text"], s["ids"], logprobs=s["logprobs"], finish_reason=s["finish"]
                        )
                        for i, s in enumerate(req["samples"])
                    ],
                    finished=done,
                    metrics=RequestMetrics(arrival_time=0.0),
                )
            )
            if done:
                self.abort(rid)
        return outputs

    def get_stats(self):
        return EngineStats(
            num_waiting=0,
            num_running=len(self.requests),
            num_preempted_total=0,
            kv_blocks_total=100,
            kv_blocks_used=self.blocks_used,
            kv_blocks_cached_free=0,
            prefix_cache_hit_tokens_total=0,
            prompt_tokens_total=0,
            generation_tokens_total=0,
            tokens_per_expert=[[1, 2], [3, 4]],
        )


@pytest.fixture(scope="module")
def fake_server(tokenizer, serve_in_process):
    engine = FakeEngine(tokenizer, tokenizer.encode("héllo wörld, the fox STOP jumps ✓ 猫 over"))
    with serve_in_process(engine, model_name="fake") as srv:
        yield srv.client, engine, tokenizer


def _sse_events(body: str) -> list[dict | str]:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    events: list[dict | str] = []
    for block in body.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_shape_and_stop(fake_server) -> None:
    client, _, tokenizer = fake_server
    r = client.post(
        "/v1/completions", json={"model": "fake", "prompt": "the fox", "max_tokens": 30, "stop": "STOP"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "fake"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and "STOP" not in choice["text"] and choice["text"]
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("the fox"))
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_stream_never_sends_a_partial_stop_string(fake_server, endpoint) -> None:
    client, _, _ = fake_server
    body = {"model": "fake", "max_tokens": 40, "stop": ["STOP"], "stream": True, "n": 2}
    body |= {"prompt": "x"} if "chat" not in endpoint else {"messages": [{"role": "user", "content": "x"}]}
    full = client.post(endpoint, json={**body, "stream": False}).json()
    r = client.post(endpoint, json={**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    texts = {0: "", 1: ""}
    for e in events[:-2]:
        (c,) = e["choices"]
        texts[c["index"]] += c.get("text") if "chat" not in endpoint else c["delta"].get("content", "")
    # The stop string arrives over several tokens; had its start been sent, the streamed text would
    # be longer than the final text, which the engine cut before the stop string.
    for c in full["choices"]:
        assert c["finish_reason"] == "stop"
        expected = c["text"] if "chat" not in endpoint else c["message"]["content"]
        assert texts[c["index"]] == expected


def test_logprobs_shapes(fake_server) -> None:
    client, _, _ = fake_server
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
        == 5
    )
    assert all(v == -0.5 for v in lp["token_logprobs"]) and all(len(t) == 2 for t in lp["top_logprobs"])
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["top_logprobs"][2]["logprob"] == -9999.0  # -inf is not JSON
    assert bytes(content[0]["bytes"]).decode("utf-8", errors="replace") == content[0]["token"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "n": True}).encode(), 400, "n"),
        (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({"prompt": "x", "frobnicate": 1}).encode(), 400, "frobnicate"),
        (json.dumps({"prompt": [1, 2, 999999]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "logit_bias": {"abc": 1}}).encode(), 400, "logit_bias"),
        (json.dumps({"prompt": "x " * 200}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": 1000}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "model": "gpt-5"}).encode(), 404, "model"),
    ],
)
def test_errors_in_openai_shape(fake_server, body, status, param) -> None:
    client, _, _ = fake_server
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, status, param)


def test_unauthorized_and_unknown_route(fake_server) -> None:
    client, _, _ = fake_server
    r = httpx.post(f"{client.base_url}/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_and_tokenize(fake_server) -> None:
    client, _, tokenizer = fake_server
    ids = client.post("/tokenize", json={"prompt": "héllo wörld"}).json()
    assert ids["tokens"] == tokenizer.encode("héllo wörld") and ids["count"] == len(ids["tokens"])
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "héllo wörld"
    text = client.get("/metrics").text
    assert 'moetron_expert_tokens_total{layer="1",expert="0"} 3' in text
    assert "moetron_kv_blocks_free 100" in text


def test_engine_failure_mid_stream_is_an_sse_error_event(tokenizer, serve_in_process) -> None:
    script = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    engine = GatedEngine(FakeEngine(tokenizer, script, fail_after=1))  # the second step raises
    with serve_in_process(engine, model_name="fake") as srv:
        body = {"prompt": "the", "max_tokens": 20, "stream": True}
        with srv.client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            engine.allow(1)  # one token, whose chunk the client holds before the engine fails
            first = json.loads(next(line for line in lines if line).removeprefix("data: "))
            assert first["choices"][0]["text"]
            engine.open()
            error, done = _sse_events("".join(f"{line}\n\n" for line in lines if line))
        assert set(error["error"]) == {"message", "type", "param", "code"} and done == "[DONE]"
        # The engine is gone: health says so and new work is refused with 503, never a hang.
        assert srv.client.get("/health").status_code == 503
        r = srv.client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
        assert assert_openai_error(r, 503)["code"] == "engine_dead"
