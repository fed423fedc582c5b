"""The HTTP layer: OpenAI's routes on FastAPI, translating each request into engine calls.

Bodies are read raw and validated by `protocol.parse` (strict, unknown fields refused), so every
failure, 401/404/429 included, leaves in OpenAI's error shape. A generation request counts as in
flight from admission until its response is sent; that count is what `--max-queued-requests`
bounds and what a SIGTERM drain waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moetron.data.tokenizer import Tokenizer
from moetron.infer.outputs import RequestOutput
from moetron.serve import protocol as P
from moetron.serve import responses as R
from moetron.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from moetron.serve.metrics import ServerMetrics

log = logging.getLogger("moetron.serve")


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    vocab_size: int  # the model's: prompt token ids must lie below it
    max_model_len: int
    api_key: str | None = None
    max_queued_requests: int | None = None
    lora_names: list[str] = field(default_factory=list)  # LoRA adapters served by name (--lora-modules)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.tokens = R.TokenText(self.tokenizer)


def _error_response(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


class _Timing:
    """Server-side TTFT/TPOT of one engine request, from outputs as they arrive."""

    def __init__(self, start: float) -> None:
        self.start, self.first, self.last, self.tokens = start, None, None, 0

    def seen(self, out: RequestOutput) -> None:
        tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        if tokens > self.tokens:
            now = time.monotonic()
            self.first = self.first or now
            self.last, self.tokens = now, tokens


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moetron", docs_url=None, redoc_url=None)
    app.state.server = state
    metrics = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(
            P.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(P.APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(P.APIError(500, f"internal error: {exc!r}", type="server_error"))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), state.api_key.encode()
        ):
            raise P.APIError(
                401, "incorrect or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    async def guarded(
        endpoint: str, request: Request, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        try:
            authorize(request)
            response = await handler()
        except P.APIError as e:
            response = _error_response(e)
        except EngineDeadError as e:
            response = _error_response(P.APIError(503, str(e), type="server_error", code="engine_dead"))
        metrics.count_request(endpoint, response.status_code)
        return response

    def admit() -> None:
        if state.draining:
            raise P.APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not state.engine.alive:
            raise EngineDeadError(f"the engine is not running ({state.engine.error!r})")
        if state.max_queued_requests is not None and metrics.in_flight >= state.max_queued_requests:
            raise P.APIError(
                429,
                f"the server holds {metrics.in_flight} requests, its limit (--max-queued-requests); retry later",
                type="rate_limit_error",
                code="queue_full",
            )

    async def submit(inputs: list[P.EngineInput], response_id: str, param: str) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, inp in enumerate(inputs):
                request_id = f"{response_id}-{i}"
                streams.append(
                    await state.engine.add_request(
                        inp.prompt_token_ids, inp.params, request_id, inp.prompt, inp.lora
                    )
                )
        except ValueError as e:  # the engine refused a prompt (over its context) or its parameters
            for s in streams:
                s.close()
            raise P.APIError(400, str(e), param=getattr(e, "param", param)) from None
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def generate(
        request: Request, inputs: list[P.EngineInput], renderer: R.Renderer, stream: bool
    ) -> Response:
        """Run the engine requests of one HTTP request; a full body, or SSE chunks as they come."""
        admit()
        start = time.monotonic()
        metrics.in_flight += 1
        streams: list[RequestStream] = []
        timings = [_Timing(start) for _ in inputs]
        latest: list[RequestOutput | None] = [None] * len(inputs)

        closed = False

        def finish() -> None:  # idempotent: the stream's generator and its response both call it
            nonlocal closed
            if closed:
                return
            closed = True
            metrics.in_flight -= 1
            for s, t, out in zip(streams, timings, latest, strict=False):
                s.close()
                reason = (
                    (out.outputs[0].finish_reason or "abort") if out is not None and out.finished else "abort"
                )
                completion = out.num_generated_tokens if out is not None else 0
                metrics.count_finished(reason, len(out.prompt_token_ids) if out else 0, completion)
                if t.first is not None:
                    metrics.ttft.observe(t.first - t.start)
                    metrics.e2e.observe(t.last - t.start)
                    if t.tokens > 1:
                        metrics.tpot.observe((t.last - t.first) / (t.tokens - 1))

        try:
            streams = await submit(inputs, renderer.id, renderer.endpoint.prompt_field)
        except BaseException:
            finish()
            raise

        async def merged() -> AsyncIterator[tuple[int, RequestOutput]]:
            async for i, out in _merge(streams):
                latest[i] = out
                timings[i].seen(out)
                yield i, out

        if not stream:
            try:
                async with contextlib.aclosing(merged()) as outs:
                    await _until_disconnect(request, _drain(outs))
                return JSONResponse(renderer.response([o for o in latest if o is not None]))
            finally:
                finish()

        async def events() -> AsyncIterator[str]:
            try:
                async with contextlib.aclosing(merged()) as outs:
                    async for i, out in outs:
                        for chunk in renderer.chunks(i, out):
                            yield _sse(chunk)
                for chunk in renderer.final_chunks([o for o in latest if o is not None]):
                    yield _sse(chunk)
            except Exception as e:  # headers are gone: report in-band
                log.exception("error while streaming %s", renderer.id)
                yield _sse(P.APIError(500, f"generation failed: {e!r}", type="server_error").body())
            finally:
                finish()
            yield "data: [DONE]\n\n"

        return _EventStream(
            events(), finish, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return _error_response(P.APIError(503, "the server is shutting down", type="server_error"))
        if not state.engine.alive:
            return _error_response(
                P.APIError(503, f"the engine is not running ({state.engine.error!r})", type="server_error")
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = await asyncio.wait_for(state.engine.stats(), timeout=30) if state.engine.alive else None
        return PlainTextResponse(metrics.render(stats), media_type="text/plain; version=0.0.4")

    def model_card(adapter: str | None = None) -> dict:
        return {
            "id": adapter or state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "moetron",
            "root": state.model_name,
            "parent": state.model_name if adapter else None,
            "max_model_len": state.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def handle() -> Response:
            cards = [model_card(), *(model_card(name) for name in state.lora_names)]
            return JSONResponse({"object": "list", "data": cards})

        return await guarded("models", request, handle)

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        async def handle() -> Response:
            return JSONResponse(model_card(P.check_model(model, state.model_name, state.lora_names)))

        return await guarded("models", request, handle)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def handle() -> Response:
            req = P.parse(P.CompletionRequest, await request.body())
            lora = P.check_model(req.model, state.model_name, state.lora_names)
            _check_stream_options(req)
            inputs = P.completion_inputs(req, state.tokenizer, state.vocab_size, state.max_model_len)
            for inp in inputs:
                inp.lora = lora
            r = R.CompletionRenderer(lora or state.model_name, state.tokens, req, inputs)
            return await generate(request, inputs, r, req.stream)

        return await guarded("completions", request, handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle() -> Response:
            req = P.parse(P.ChatCompletionRequest, await request.body())
            lora = P.check_model(req.model, state.model_name, state.lora_names)
            _check_stream_options(req)
            inputs = [P.chat_input(req, state.tokenizer, state.vocab_size, state.max_model_len)]
            inputs[0].lora = lora
            r = R.ChatRenderer(lora or state.model_name, state.tokens, req, inputs)
            return await generate(request, inputs, r, req.stream)

        return await guarded("chat_completions", request, handle)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        async def handle() -> Response:
            req = P.parse(P.TokenizeRequest, await request.body())
            P.check_model(req.model, state.model_name, state.lora_names)
            if (req.prompt is None) == (req.messages is None):
                raise P.APIError(400, "give exactly one of prompt or messages", param="prompt")
            text = (
                req.prompt
                if req.prompt is not None
                else P.render_chat(req.messages or [], state.tokenizer, req.add_generation_prompt)
            )
            ids = (
                state.tokenizer.backend.encode(text, add_special_tokens=True).ids  # its post-processor's BOS
                if req.add_special_tokens
                else state.tokenizer.encode(text)
            )
            return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

        return await guarded("tokenize", request, handle)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        async def handle() -> Response:
            req = P.parse(P.DetokenizeRequest, await request.body())
            P.check_model(req.model, state.model_name, state.lora_names)
            P.check_token_ids(req.tokens, state.vocab_size, "tokens")
            return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})

        return await guarded("detokenize", request, handle)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        async def handle() -> Response:
            return JSONResponse(_tokenizer_info(state.tokenizer, state.max_model_len))

        return await guarded("tokenizer_info", request, handle)

    return app


def _tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's Hugging Face config (what `tokenizer_config.json`
    holds). lm-eval's remote tokenizer reads the special tokens and the chat template from it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": tokenizer.chat_template,
        "model_max_length": max_model_len,
        "add_bos_token": False,  # moetron never adds special tokens to a prompt
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


class _EventStream(StreamingResponse):
    """Runs `on_close` however the response ends. A client that vanishes cancels Starlette's
    sending task, possibly before the generator has started (then its own `finally` never runs);
    the engine requests must be aborted now, not whenever the generator is garbage-collected."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


def _check_stream_options(req: P._SamplingRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise P.APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


async def _drain(outs: AsyncIterator[Any]) -> None:
    async for _ in outs:
        pass


async def _until_disconnect(request: Request, work: Awaitable[None]) -> None:
    """Await `work`, cancelling it if the client disconnects first (its requests get aborted)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await task
    finally:
        watcher.cancel()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams as they arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
