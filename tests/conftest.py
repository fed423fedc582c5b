"""What the test files share: a BPE tokenizer and a tiny served model directory, an engine wrapper
whose steps run only when the test allows them, moetron's server in process, and OpenAI's error
shape.

Time decides no outcome here. `GatedEngine` makes "a request is in flight" a state the test creates
rather than a race against decoding, and every wait is on an event, with a generous timeout that
only turns a hang into a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

# The serving stack and torch are imported where they are used, so that a test file needing none
# of them does not import them to collect.
if TYPE_CHECKING:
    from moetron.data.tokenizer import Tokenizer
    from moetron.infer.outputs import RequestOutput
    from moetron.serve.server import DrainingServer

HANG_GUARD_S = 60.0  # fails a test that hangs; no test expects to come near it
API_KEY = "test-key"  # the in-process server's; test_serve_server gives `moetron serve` the same
GATE_POLL_S = 0.01  # how often a gated engine thread looks for commands: a latency, never an outcome


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """Byte-level BPE (400 tokens) trained on ~20 KB of the bundled Shakespeare."""
    from moetron.data.shakespeare import documents
    from moetron.data.tokenizer import train_bpe

    return train_bpe([documents()[0][:20_000]], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The `tiny` preset (context 256) with random weights (seed 0) and `tokenizer`: a directory
    that `moetron serve`, `LLMEngine.from_pretrained` and `transformers` all load."""
    import torch

    from moetron.config import get_preset
    from moetron.convert.hf import save_pretrained
    from moetron.model.transformer import Transformer

    directory = tmp_path_factory.mktemp("tiny-moe")
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_pretrained(Transformer.from_config(cfg), directory)
    tokenizer.save(directory)
    return directory


class GatedEngine:
    """An engine (real or fake) whose steps run only as the test allows: `allow(n)` lets n steps
    run, `open()` all of them.

    While no step is allowed, `step()` returns no outputs after a short wait on the gate, so the
    engine thread still applies the adds, aborts and stats queries that arrive between steps: a
    request stays in flight, unfinished, until the test lets it go on. Everything else is the
    wrapped engine's. The requests added and aborted and the steps taken are recorded, and
    `wait_for` blocks until they satisfy a condition.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.steps = 0
        self._allowed = 0
        self._open = False
        self._changed = threading.Condition()

    def __getattr__(self, name: str) -> Any:  # tokenizer, vocab_size, max_model_len, get_stats, ...
        return getattr(self.engine, name)

    def allow(self, num_steps: int = 1) -> None:
        with self._changed:
            self._allowed += num_steps
            self._changed.notify_all()

    def open(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Block until `condition()` holds; it is checked whenever the engine thread records
        something, under the lock that guards the records."""
        with self._changed:
            assert self._changed.wait_for(condition, HANG_GUARD_S), f"gave up waiting for {what}"

    def add_request(
        self, prompt_token_ids: list[int], params: Any, request_id: str, prompt: str | None = None
    ) -> Any:
        result = self.engine.add_request(prompt_token_ids, params, request_id=request_id, prompt=prompt)
        self._record(lambda: self.added.append(request_id))
        return result

    def abort(self, request_id: str) -> Any:
        try:
            return self.engine.abort(request_id)
        finally:
            self._record(lambda: self.aborted.append(request_id))

    def step(self) -> list[RequestOutput]:
        with self._changed:
            if not self._changed.wait_for(lambda: self._open or self._allowed > 0, GATE_POLL_S):
                return []
            if not self._open:
                self._allowed -= 1
        outputs = self.engine.step()
        self._record(self._count_step)
        return outputs

    def _count_step(self) -> None:
        self.steps += 1

    def _record(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()


@dataclasses.dataclass
class InProcessServer:
    server: DrainingServer
    thread: threading.Thread  # runs `server`; it ends when the server exits
    client: httpx.Client  # base URL and API key set
    port: int

    def metrics(self) -> dict[str, float]:
        from moetron.serve.metrics import parse_metrics

        return parse_metrics(self.client.get("/metrics").text)


@pytest.fixture(scope="session")
def serve_in_process() -> Callable[..., contextlib.AbstractContextManager[InProcessServer]]:
    """`with serve_in_process(engine, ...) as srv:` runs the server `moetron serve` runs
    (`make_server`: the app, the SIGTERM drain) around `engine`, on loopback, in a thread."""

    @contextlib.contextmanager
    def serve(
        engine: Any, *, model_name: str, max_queued_requests: int | None = None
    ) -> Iterator[InProcessServer]:
        from moetron.serve.server import make_state, serve_in_thread

        state = make_state(engine, model_name, api_key=API_KEY, max_queued_requests=max_queued_requests)
        with serve_in_thread(state, HANG_GUARD_S) as running:
            client = httpx.Client(
                base_url=running.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=HANG_GUARD_S
            )
            try:
                yield InProcessServer(running.server, running.thread, client, running.port)
            finally:
                client.close()
        assert not running.thread.is_alive(), "the in-process server did not stop"

    return serve


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    """`r` is an error in OpenAI's shape with this status (and this `param`, unless "any")."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "any":
        assert error["param"] == param, error
    return error


# --- Shared by the engine's unit tests.


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside, the previous one restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Thousands of tiny forwards: thread start-up costs more than it saves there."""
    with torch_threads(1):
        yield


CHI2_P_THRESHOLD = 1e-3  # fixed seeds: deterministic; fails only for a real mismatch (or 1-in-1000 bad luck)


def chi_square_p_value(counts: Any, expected_probs: Any) -> float:
    """Chi-square goodness of fit of draw counts to probabilities (torch tensors); cells expecting
    fewer than 5 draws are pooled into one. A draw the probabilities rule out fails at once."""
    import torch

    expected = counts.sum() * expected_probs
    assert counts[expected_probs == 0].sum() == 0, "drew an outcome whose probability is 0"
    small = (expected < 5) & (expected_probs > 0)
    observed_cells = torch.cat([counts[expected >= 5], counts[small].sum().reshape(1)])
    expected_cells = torch.cat([expected[expected >= 5], expected[small].sum().reshape(1)])
    keep = expected_cells > 0
    chi2 = ((observed_cells[keep] - expected_cells[keep]) ** 2 / expected_cells[keep]).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), chi2 / 2).item()


def make_sequence(token_ids: list[int], request_id: str = "r") -> Any:
    """A greedy request's sequence 0 over `token_ids`, for scheduler and block-manager tests."""
    from moetron.infer.detokenizer import StopChecker
    from moetron.infer.outputs import RequestMetrics
    from moetron.infer.sampling import SamplingState
    from moetron.infer.sampling_params import SamplingParams
    from moetron.infer.sequence import Request, Sequence

    params = SamplingParams()
    request = Request(request_id, None, token_ids, params, RequestMetrics(arrival_time=0.0))
    return Sequence(request, 0, SamplingState(params, token_ids, []), StopChecker(params, None))


def reference_greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by full recompute through the model's own forward (causal SDPA, no KV cache)
    with training's kernels: an independent path to the tokens the engine and llama.cpp must give.
    A model an engine has served is copied and its kernels restored (the engine keeps its own)."""
    import copy

    import torch

    from moetron.infer import serving_kernels

    if serving_kernels.installed(model) is not None:
        model = copy.deepcopy(model)
        serving_kernels.restore(model)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def write_shakespeare_corpus(directory: Path, max_chars: int) -> Path:
    """The bundled Shakespeare as plain-text documents (a user-data source), up to ~max_chars."""
    from moetron.data import read_documents

    directory.mkdir(parents=True, exist_ok=True)
    size = 0
    for k, document in enumerate(read_documents(["shakespeare"])):
        (directory / f"doc{k:04d}.txt").write_text(document)
        size += len(document)
        if size > max_chars:
            break
    return directory
