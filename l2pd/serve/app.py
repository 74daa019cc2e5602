"""The HTTP front end: OpenAI-compatible routes over one or more engines (FastAPI).

``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template), ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Requests go to the least-loaded engine; the engine's thread reports final
tokens, which reach the request's coroutine through its event loop. Streaming sends server-sent events, each
piece of text once it and all before it are final; a client that goes away cancels its request, which frees
its row at the engine's next iteration. A full queue answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..engine import EngineClosed
from .metrics import Metrics
from .protocol import ApiError, Parsed, engine_error, parse_body, parse_request


class Server:
    """What the routes share: engines, tokenizer, limits."""

    def __init__(self, engines: list[Any], tokenizer: Any, model_name: str, max_queue: int = 256,
                 request_timeout: float = 600.0, default_max_tokens: int = 256, drain: float = 30.0) -> None:
        if not engines:
            raise ValueError("a server needs at least one engine")
        self.engines, self.tokenizer, self.model_name = engines, tokenizer, model_name
        self.max_queue, self.request_timeout, self.default_max_tokens = max_queue, request_timeout, default_max_tokens
        self.drain = drain
        self.max_length = min(e.max_length for e in engines)
        self.metrics = Metrics(engines)
        self.created = int(time.time())

    def submit(self, parsed: Parsed, on_event: Any, request_id: str) -> Any:
        waiting = sum(len(e.waiting) for e in self.engines)
        free = sum(e.max_batch - len(e.rows) for e in self.engines)
        if waiting - free >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        engine = min(self.engines, key=lambda e: e.load())
        try:
            return engine.submit(parsed.prompt_ids, on_event=on_event, request_id=request_id, stop=parsed.stop,
                                 timeout=self.request_timeout, **parsed.options)
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except ValueError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise engine_error(exc) from None

    def text(self, req: Any) -> str:
        """The answer's text, cut before the stop string that ended it."""
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        if req.stop_hit is not None:
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        return text


def build_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for e in server.engines:
            e.start()
        yield
        # uvicorn has stopped accepting and waited for open requests; whatever is left gets the drain time
        await asyncio.gather(*(asyncio.to_thread(e.stop, server.drain) for e in server.engines))

    app = FastAPI(title="l2pd", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        if any(e.closed for e in server.engines):
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "l2pd", "max_model_len": server.max_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(server, request, chat=True)

    return app


async def _complete(server: Server, request: Request, chat: bool):
    try:
        body = parse_body(await request.body())
        parsed = parse_request(body, server.tokenizer, chat, server.max_length, server.default_max_tokens)
        if parsed.model is not None and parsed.model != server.model_name:
            raise ApiError(404, f"model {parsed.model!r} is not served here (this server serves "
                                f"{server.model_name!r})", "model", code="model_not_found")
    except ApiError as exc:
        if exc.status == 400:
            server.metrics.rejected.labels("invalid").inc()
        raise
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(req: Any, tokens: list[int]) -> None:  # on the engine's thread
        loop.call_soon_threadsafe(queue.put_nowait, req.finish_reason)

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    req = server.submit(parsed, on_event, rid)
    if parsed.stream:
        return StreamingResponse(_stream(server, request, req, parsed, queue, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while not req.done.is_set():
            try:
                await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    return Response(status_code=499)
    except asyncio.CancelledError:
        req.cancel()
        raise
    _raise_for(req, server)
    text = server.text(req)
    choice: dict[str, Any] = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": [choice], "usage": _usage(req)}


def _raise_for(req: Any, server: Server) -> None:
    if req.finish_reason == "timeout":
        raise ApiError(504, f"the request did not finish within {server.request_timeout:g} s", type="timeout",
                       code="timeout")
    if req.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled (the server is shutting down)", type="server_error")
    if req.finish_reason == "error":
        raise ApiError(500, f"decoding failed: {req.error}", type="server_error")


def _usage(req: Any) -> dict[str, int]:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt) + len(req.tokens), "forwards": req.forwards}


async def _stream(server: Server, request: Request, req: Any, parsed: Parsed, queue: asyncio.Queue, rid: str):
    """Server-sent events: text as it becomes final (held back while it could be the start of a stop string
    or an incomplete character), then the finish reason, the usage if asked, and ``[DONE]``."""
    chat, created = parsed.chat, int(time.time())
    hold = max((len(s) for s in parsed.stop), default=1) - 1
    sent = 0

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": server.model_name, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        checked = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked > 0.2:  # a client that went away frees its row
                checked = time.monotonic()
                if await request.is_disconnected():
                    return  # (finally: cancel)
            done = req.done.is_set()
            text = server.text(req)
            if not done:  # not yet final: a partial character, or what may become a stop string
                end = len(text) - hold
                if text.endswith("\ufffd"):
                    end = min(end, len(text) - 1)
                if end > sent:
                    yield chunk(text[sent:end], None)
                    sent = end
                continue
            if req.finish_reason not in ("stop", "length"):
                try:
                    _raise_for(req, server)
                except ApiError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            yield chunk(text[sent:], req.finish_reason)
            if parsed.include_usage:
                data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": server.model_name, "choices": [], "usage": _usage(req)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not req.done.is_set():  # the client went away (or the server is closing): free the row
            req.cancel()
