"""An OpenAI-compatible app over `Model`'s engine: POST /v1/chat/completions (streamed or not),
GET /v1/models, GET /health. Errors come in OpenAI's shape `{"error": {message, type, param, code}}`.

The engine runs on its worker thread; each request is submitted with the event loop, and its
tokens arrive as an async stream. A streaming client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..api import Model
from ..engine import QueueFull

ROLES = ("system", "user", "assistant")
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "min_p": "min_p",
                   "top_k": "top_k", "repetition_penalty": "repetition_penalty"}
IMAGE_FIELDS = ("min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {list(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"messages[{i}].content must be a string or a non-empty list of parts",
                           f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise ApiError(400, "image_url must be a data: URL with base64 image bytes (remote and file "
                                   "URLs are not enabled)", f"messages[{i}].content[{j}].image_url")
                parts.append({"type": "image", "image": url})
            else:
                raise ApiError(400, f"unsupported content part {kind!r}; use 'text' or 'image_url'",
                               f"messages[{i}].content[{j}]")
        out.append({"role": m["role"], "content": parts})
    return out


def _options(body: dict) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
        opts["max_new_tokens"] = max_tokens
    for key, name in SAMPLING_FIELDS.items():
        if body.get(key) is not None:
            opts[name] = body[key]
    stop = body.get("stop")
    if stop is not None:
        opts["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    for key in IMAGE_FIELDS:
        if body.get(key) is not None:
            opts[key] = body[key]
    return opts


def create_app(model: Model, served_model_name: str = "lfm2vl") -> FastAPI:
    app = FastAPI(title="lfm2vl", docs_url=None, redoc_url=None)
    model.engine.start()

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "lfm2vl"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, served_model_name):
            raise ApiError(404, f"model {body.get('model')!r} does not exist; this server serves "
                           f"{served_model_name!r}", "model", "model_not_found")
        messages, opts = _messages(body), _options(body)
        try:
            handle = model.engine.submit(model.request(messages, **opts), loop=asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(503, str(e), kind="server_error", code="queue_full") from e
        except (ValueError, TypeError, OSError) as e:
            raise ApiError(400, str(e)) from e
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(request, handle, rid, created, served_model_name, include_usage),
                                     media_type="text/event-stream")
        text, reason, last = "", None, None
        async for event in handle.events_async():
            text += event.text
            reason, last = event.finish_reason, event
        if reason == "error":
            raise ApiError(500, last.error or "generation failed", kind="server_error")
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(reason)}],
            "usage": _usage(last),
        }

    return app


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(event) -> dict[str, int]:
    p, c = event.prompt_tokens, event.generation_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _sse(request: Request, handle, rid: str, created: int, name: str, include_usage: bool):
    def chunk(delta: dict, reason: str | None, usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        if usage is not None:
            body = {**body, "choices": [], "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for event in handle.events_async():
            if await request.is_disconnected():
                handle.cancel()
                return
            if event.text:
                yield chunk({"content": event.text}, None)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(event.error or 'generation failed', 'server_error'))}\n\n"
                else:
                    yield chunk({}, _finish(event.finish_reason))
                    if include_usage:
                        yield chunk({}, None, _usage(event))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away
