"""The OpenAI-compatible app over `Model`'s engine (docs/serving.md).

Routes: POST /v1/chat/completions and /v1/completions (streamed as Server-Sent Events or not),
GET /v1/models, /v1/models/{id}, /health, /metrics, and the chat page at / (ui/; off with --no-ui).
Requests are parsed and checked in protocol.py, images read within the operator's policy in
images.py, then one engine request is submitted; its tokens arrive on this event loop as an async
stream. A client that disconnects cancels its request (the slot is freed at the engine's next step).
On shutdown (SIGTERM) uvicorn stops accepting, lets in-flight requests finish, then the engine's
worker is stopped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import Model
from ..engine import ContextOverflow, QueueFull, RequestHandle, StreamEvent
from ..engine import Request as EngineRequest
from . import protocol, ui
from .errors import ApiError, error_body
from .images import read_image
from .metrics import CONTENT_TYPE, Metrics
from .middleware import Observe, body_too_large
from .settings import ServerSettings

log = logging.getLogger("lfm2vl.server")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


def create_app(model: Model, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    if model.processor is None:
        raise ValueError(f"{model.source} has no tokenizer.json / chat template: it cannot be served")
    engine, name = model.engine, settings.served_model_name
    metrics = Metrics(engine)
    token_bytes = functools.lru_cache(maxsize=1 << 16)(model.processor.text_tokenizer.token_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, True)  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="lfm2vl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Observe, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        request.state.log = {**getattr(request.state, "log", {}), "error": e.code or e.kind}
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=e)
        return JSONResponse(error_body("internal server error (the server log has the details)", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "lfm2vl",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict:
        _check_model(model_id, name)
        return model_card()

    async def submit(req: EngineRequest, opts: dict, param: str) -> RequestHandle:
        if "max_new_tokens" not in opts:  # unset: the checkpoint's default, within what the context leaves
            room = engine.max_len - len(req.ids)
            if 1 <= room < req.params.max_new_tokens:
                req.params = replace(req.params, max_new_tokens=room,
                                     min_new_tokens=min(req.params.min_new_tokens, room))
        need = len(req.ids) + req.params.max_new_tokens
        if need > engine.max_len:
            raise ApiError(400, f"this request needs {len(req.ids)} prompt tokens (image tokens included) + "
                           f"max_tokens {req.params.max_new_tokens} = {need}, over the model's context of "
                           f"{engine.max_len}; shorten the prompt, lower max_image_tokens or max_tokens", param,
                           "context_length_exceeded")
        try:
            return engine.submit(req, loop=asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(503, f"{e} (server flag --max-queue)", None, "queue_full",
                           headers={"Retry-After": str(settings.retry_after_s)}) from e
        except ContextOverflow as e:
            raise ApiError(400, str(e), param, "context_length_exceeded") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    async def build(make: Callable[[], EngineRequest]) -> EngineRequest:
        try:
            return await asyncio.to_thread(make)  # image decoding and tokenizing stay off the event loop
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from e

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_json(request, settings)
        _check_model(body.get("model"), name)
        protocol.check_chat_fields(body)
        messages, images = protocol.chat_messages(body, settings.max_images)
        opts = protocol.sampling_options(body)
        logprobs = protocol.chat_logprobs(body)
        include_usage = _include_usage(body)

        def make() -> EngineRequest:
            deadline = time.monotonic() + settings.image_fetch_timeout_s  # for all of this request's remote images
            loaded = [read_image(url, settings, param, deadline) for url, param in images]
            return model.request(protocol.fill_images(messages, loaded.__getitem__), **opts, logprobs=logprobs)

        handle = await submit(await build(make), opts, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def choice(text: str, events: list[tuple[StreamEvent, int]], reason: str | None, final: bool) -> dict:
            lp = None
            if logprobs is not None:
                lp = {"content": [protocol.chat_logprob_entry(e.token, e.logprob, e.top_logprobs, token_bytes)
                                  for e, _ in events]}
            if final:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": reason}
            return {"index": 0, "delta": {"content": text} if text or reason is None else {}, "logprobs": lp,
                    "finish_reason": reason}

        return await _respond(request, handle, rid, "chat.completion", name, choice, bool(body.get("stream")),
                              include_usage, metrics, first_delta={"role": "assistant", "content": ""})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _read_json(request, settings)
        _check_model(body.get("model"), name)
        protocol.check_completion_fields(body)
        prompt = protocol.completion_prompt(body)
        opts = protocol.sampling_options(body)
        opts.setdefault("max_new_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        logprobs = protocol.completion_logprobs(body)
        include_usage = _include_usage(body)
        handle = await submit(await build(lambda: model.text_request(prompt, **opts, logprobs=logprobs)), opts,
                              "prompt")
        def choice(text: str, events: list[tuple[StreamEvent, int]], reason: str | None, final: bool) -> dict:
            lp = None
            if logprobs is not None:
                entries = [(e.token, e.logprob, e.top_logprobs, offset) for e, offset in events]
                lp = protocol.completion_logprobs_block(entries, token_bytes)
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}

        return await _respond(request, handle, f"cmpl-{uuid.uuid4().hex}", "text_completion", name, choice,
                              bool(body.get("stream")), include_usage, metrics)

    if settings.ui:  # the chat page at / (lfm2vl/server/ui/)
        app.include_router(ui.router(model, settings))
    return app


def _check_model(requested: Any, name: str) -> None:
    if requested not in (None, name):
        raise ApiError(404, f"model {requested!r} does not exist; this server serves {name!r}", "model",
                       "model_not_found")


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    if not body.get("stream"):
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    return options.get("include_usage", False)


async def _read_json(request: Request, settings: ServerSettings) -> dict:
    """The body as a JSON object, read within the size limit (a chunked body is counted as it arrives)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise ApiError(413, body_too_large(settings)["error"]["message"], None, "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    return body


Choice = Callable[[str, list[tuple[StreamEvent, int]], "str | None", bool], dict]


async def _respond(request: Request, handle: RequestHandle, rid: str, kind: str, name: str, choice: Choice,
                   stream: bool, include_usage: bool, metrics: Metrics, first_delta: dict | None = None) -> Response:
    created = int(time.time())
    request.state.log = {"id": rid, "prompt_tokens": len(handle.request.ids)}

    def envelope(choices: list[dict], usage: dict | None = None, suffix: str = "") -> dict:
        out = {"id": rid, "object": kind + suffix, "created": created, "model": name, "choices": choices}
        return {**out, "usage": usage} if usage is not None else out

    def done(last: StreamEvent) -> dict:
        c = handle.completion
        metrics.ttft.observe(c.ttft_s or c.total_s)
        metrics.latency.observe(c.total_s)
        request.state.log.update(completion_tokens=last.generation_tokens, cached=last.cached_tokens,
                                 ttft=f"{c.ttft_s:.3f}s", finish=last.finish_reason)
        return protocol.usage(last.prompt_tokens, last.generation_tokens, last.cached_tokens)

    if not stream:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            text, events, last = "", [], None
            async for event in handle.events_async():
                if event.token is not None and event.logprob is not None:
                    events.append((event, len(text)))  # a token's text starts where the text so far ends
                text += event.text
                last = event
        finally:
            watcher.cancel()
            handle.cancel()  # a no-op once finished; frees the slot if this handler was cancelled
        if last.finish_reason == "error":
            raise ApiError(500, f"generation failed: {last.error}", None, "generation_failed")
        if last.finish_reason == "cancelled":
            raise ApiError(499, "the request was cancelled", None, "cancelled")
        usage = done(last)
        return JSONResponse(envelope([choice(text, events, protocol.finish_reason(last.finish_reason), True)], usage))

    suffix = ".chunk" if kind == "chat.completion" else ""

    async def events() -> AsyncIterator[str]:
        emitted = 0  # characters of text sent so far (where the next token's text starts)
        try:
            if first_delta is not None:
                yield _sse(envelope([{"index": 0, "delta": first_delta, "logprobs": None, "finish_reason": None}],
                                    suffix=suffix))
            async for event in handle.events_async():
                if event.finish_reason == "error":
                    yield _sse(error_body(f"generation failed: {event.error}", "server_error", None,
                                          "generation_failed"))
                    break
                if event.finish_reason == "cancelled":
                    break
                with_lp = [(event, emitted)] if event.token is not None and event.logprob is not None else []
                reason = protocol.finish_reason(event.finish_reason) if event.finish_reason else None
                emitted += len(event.text)
                if event.text or with_lp or reason:
                    yield _sse(envelope([choice(event.text, with_lp, reason, False)], suffix=suffix))
                if reason is not None:
                    usage = done(event)
                    if include_usage:
                        yield _sse(envelope([], usage, suffix))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a no-op once finished; frees the slot when the client went away

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    while not handle.done:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.2)
