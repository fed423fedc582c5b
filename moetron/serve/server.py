"""`moetron serve`: load the engine, run uvicorn, and drain on SIGTERM.

SIGTERM does not stop the listener at once (uvicorn's default): the server keeps answering, giving
new generation requests 503 and /health 503 (so a load balancer moves away), lets the requests in
flight finish, then exits with status 0. A second SIGTERM, or SIGINT, stops it at once. Served
across processes, the drain covers every rank: rank 0 stops the others once it has drained.

If a serving rank dies, the requests in flight fail with an OpenAI-shaped error, new ones get 503,
and a moment later the server exits with status 1 (so a supervisor restarts it).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from moetron.serve.api import ServerState, build_app
from moetron.serve.async_engine import AsyncEngine

log = logging.getLogger("moetron.serve")
# After a serving rank dies the server stays up this long, answering 503, so that clients in flight
# get their errors before the connection goes.
RANK_DEATH_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self.drain_deadline = float("inf")
        self.exit_code = 0
        self.failed_at: float | None = None  # when a serving rank was found dead

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's signal handler (installed from the main thread only); tests call it directly.
        if sig == signal.SIGTERM and not self.state.draining:
            self.state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
            log.warning(
                "SIGTERM: draining %d requests in flight, refusing new ones", self.state.metrics.in_flight
            )
            return
        super().handle_exit(sig, frame)

    def drained(self) -> bool:
        """A drain has ended: nothing is left in flight, or the drain timeout has passed."""
        return self.state.draining and (
            self.state.metrics.in_flight == 0 or time.monotonic() > self.drain_deadline
        )

    async def on_tick(self, counter: int) -> bool:  # uvicorn calls this every 0.1 s
        if self.drained():
            self.should_exit = True
        engine = self.state.engine
        if self.failed_at is None and (dead := engine.failure()) is not None:
            log.error("serving rank died: %s; failing the requests in flight, exiting", dead)
            engine.fail(RuntimeError(dead))
            self.failed_at = time.monotonic()
        if self.failed_at is not None and time.monotonic() > self.failed_at + RANK_DEATH_GRACE_S:
            self.exit_code, self.should_exit = 1, True
        return await super().on_tick(counter)


def make_state(
    engine: Any,
    model_name: str,
    api_key: str | None = None,
    max_queued_requests: int | None = None,
) -> ServerState:
    return ServerState(
        engine=AsyncEngine(engine),
        tokenizer=engine.tokenizer,
        model_name=model_name,
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        api_key=api_key,
        max_queued_requests=max_queued_requests,
        lora_names=list(getattr(engine, "lora_names", [])),
    )


def make_app(state: ServerState):
    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = build_app(state)
    app.router.lifespan_context = lifespan
    return app


@dataclass
class InThreadServer:
    server: DrainingServer
    thread: threading.Thread  # runs `server`; it ends when the server exits
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_server(
    state: ServerState,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout_s: float = 600.0,
    log_level: str = "info",
) -> DrainingServer:
    """The server `moetron serve` runs; tests run it in a thread, on a socket they bound."""
    config = uvicorn.Config(
        make_app(state), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    return DrainingServer(config, state, drain_timeout_s)


@contextmanager
def serve_in_thread(state: ServerState, join_timeout_s: float = 60.0) -> Iterator[InThreadServer]:
    """The server `moetron serve` runs (`make_server`: the app, the SIGTERM drain) around `state`,
    on a free loopback port, in a thread; stopped on exit. The socket is bound and listening before
    the thread starts, so connections wait in its backlog until uvicorn is up: no startup to poll
    for, no free port to race for. The protocol is named because asyncio sets TCP_NODELAY only on
    IPPROTO_TCP sockets (create_server's have proto 0): without it every small request waits ~40 ms
    for a delayed ACK."""
    server = make_server(state, log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield InThreadServer(server, thread, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(join_timeout_s)
        sock.close()


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queued_requests: int | None = None,
    drain_timeout_s: float = 600.0,
    log_level: str = "info",
    engine_overrides: dict[str, Any] | None = None,
) -> int:
    from moetron.infer.engine import LLMEngine

    if max_queued_requests is not None and max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests={max_queued_requests} must be >= 1")
    model_dir = Path(model_dir)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(model_dir, **(engine_overrides or {}))
    name = served_model_name or (model_dir.stem if model_dir.suffix == ".gguf" else model_dir.resolve().name)
    if engine.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json): the server needs one")
    state = make_state(engine, name, api_key, max_queued_requests)
    log.info(
        "loaded %s as %r in %.1f s (context %d tokens)",
        model_dir,
        name,
        time.perf_counter() - start,
        engine.max_model_len,
    )
    server = make_server(state, host=host, port=port, drain_timeout_s=drain_timeout_s, log_level=log_level)
    server.run()
    return server.exit_code
