"""An asyncio face for the synchronous engine: one thread owns the engine and steps it.

The engine is not thread-safe, so nothing but the engine thread touches it. Requests, aborts and
stats queries reach that thread through a queue and are applied between steps; each step's outputs
go back to the event loop in one `call_soon_threadsafe`. Outputs are cumulative, so a request's
stream keeps only the newest one: a slow client never makes the engine wait or memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moetron.infer.data_parallel import WorkerDiedError
from moetron.infer.outputs import EngineStats, RequestOutput
from moetron.infer.sampling_params import SamplingParams

log = logging.getLogger("moetron.serve")


class EngineDeadError(RuntimeError):
    """The engine thread failed or stopped; no request can be served."""


class RequestStream:
    """A request's cumulative outputs, up to the finished one. `close()` (or leaving before the
    finished output) aborts the request in the engine, which frees its KV blocks."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self._slot = _Slot()

    @property
    def finished(self) -> bool:
        return self._slot.finished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._slot.finished:
            raise StopAsyncIteration
        return await self._slot.get()

    def close(self) -> None:
        if not self._slot.finished:
            self._slot.finished = True
            self.engine.abort(self.request_id)


class _Slot:
    """The newest output of one request, or the error that ended it (event-loop side only)."""

    def __init__(self) -> None:
        self.latest: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self.latest = item
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        item = self.latest
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is not None
        self.finished = item.finished
        return item


@dataclass
class _Command:
    kind: str  # "add" | "abort" | "stats" | "stop"
    request_id: str = ""
    args: tuple = ()
    reply: Callable[[Any, BaseException | None], None] | None = None


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy whose lists the engine will not append to after this step."""
    snap = copy.copy(out)
    snap.outputs = []
    for o in out.outputs:
        c = copy.copy(o)
        c.token_ids = list(o.token_ids)
        c.logprobs = None if o.logprobs is None else list(o.logprobs)
        snap.outputs.append(c)
    return snap


class AsyncEngine:
    """`await add_request(...)` gives a `RequestStream` of the request's outputs."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, _Slot] = {}
        self._pending: set[asyncio.Future] = set()  # commands awaiting the engine thread's answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set when the engine thread died

    # -- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moetron-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_Command("stop"))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def failure(self) -> str | None:
        """A distributed engine's dead serving rank, if any (its `failure()`; None for one process)."""
        if isinstance(self.error, WorkerDiedError):  # found by the engine thread's collectives
            return str(self.error)
        check = getattr(self.engine, "failure", None)
        return check() if check is not None else None

    def fail(self, error: BaseException) -> None:
        """Mark the engine dead from the event loop (a serving rank died): every request in flight
        gets `error`, new ones are refused."""
        if self.error is None:
            self.error = error
            self._commands.put(_Command("stop"))  # an idle engine thread wakes up and leaves
            self._fail_all(EngineDeadError(f"the engine failed: {error}"))

    def _call(self, cmd: _Command) -> asyncio.Future:
        """Send a command that answers; the future resolves on the event loop."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        loop = self._loop
        assert loop is not None
        future: asyncio.Future = loop.create_future()

        def resolve(result: Any, error: BaseException | None) -> None:
            if future.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        cmd.reply = lambda result, error: loop.call_soon_threadsafe(resolve, result, error)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        self._commands.put(cmd)
        return future

    async def stats(self) -> EngineStats:
        return await self._call(_Command("stats"))

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(_Command("abort", request_id))

    async def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        lora: str | None = None,
    ) -> RequestStream:
        """Submit a request once the engine has accepted it. Raises `ValueError` for a request the
        engine refuses (a prompt over the context), so a server can still answer 400."""
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream._slot
        try:
            await self._call(_Command("add", request_id, (prompt_token_ids, params, prompt, lora)))
        except BaseException:
            stream.close()
            raise
        return stream

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        for future in list(self._pending):
            if not future.done():
                future.set_exception(error)

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:  # the engine itself failed: fail every request, refuse new ones
            log.exception("engine thread died")
            self.error = e
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine failed: {e!r}"))
        finally:
            shutdown = getattr(self.engine, "shutdown", None)  # a distributed engine stops its ranks
            if shutdown is not None:
                shutdown()

    def _loop_forever(self) -> None:
        engine = self.engine
        while True:
            # Block only while idle; with work in flight, take what has arrived and step.
            commands = [] if engine.has_unfinished_requests() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if cmd.kind == "stop":
                    return
                self._apply(cmd)
            if engine.has_unfinished_requests():
                outputs = [_snapshot(o) for o in engine.step()]
                if outputs:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _apply(self, cmd: _Command) -> None:
        engine = self.engine
        if cmd.kind == "abort":
            with contextlib.suppress(KeyError, ValueError):  # unknown: finished, or refused at add
                engine.abort(cmd.request_id)
            return
        try:
            if cmd.kind == "add":
                prompt_token_ids, params, prompt, lora = cmd.args
                adapter = {"lora": lora} if lora is not None else {}  # engines without adapters take none
                result = engine.add_request(
                    prompt_token_ids, params, request_id=cmd.request_id, prompt=prompt, **adapter
                )
            elif cmd.kind == "stats":
                result = engine.get_stats()
            else:
                raise ValueError(f"unknown engine command {cmd.kind!r}")
        except (ValueError, TypeError) as e:  # a request the engine refused; the engine is fine
            assert cmd.reply is not None
            cmd.reply(None, e)
            return
        assert cmd.reply is not None
        cmd.reply(result, None)
