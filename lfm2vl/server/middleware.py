"""ASGI middleware around every HTTP request: the API key, the body-size limit announced by
Content-Length, one access-log line when the response has been sent (streams included), and the
HTTP metrics. Routes add what they know (request id, tokens, timing) to `request.state.log`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from .errors import error_body
from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger("lfm2vl.server")
PROTECTED = "/v1/"  # the API; /health, /metrics and the page stay open
# Metric labels: known routes only, so that made-up paths cannot grow the series without bound.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
          "/", "/ui/app.js", "/ui/style.css", "/ui/config")  # the last four: the chat page (ui/)
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


def host_name(header: str) -> str:
    """A Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '[::1]'."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class Observe:
    def __init__(self, app: Any, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None
        hosts = settings.allowed_hosts
        self._hosts = None if hosts is None else LOOPBACK_HOSTS | {h.lower() for h in hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 0, "logged": False}

        def finish(note: str = "") -> None:
            if status["logged"]:
                return
            status["logged"] = True
            code = status["code"] or 499  # 499: the client went away before a response started
            path = scope.get("path", "")
            self.metrics.http.labels(route_label(path), str(code)).inc()
            client = scope.get("client") or ("-", 0)
            extra = " ".join(f"{k}={v}" for k, v in state.get("log", {}).items())
            log.info('%s:%s "%s %s" %s %.3fs %s%s', client[0], client[1], scope.get("method"), path, code,
                     time.perf_counter() - start, extra, note)

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        refusal = self._refuse(scope)
        try:
            if refusal is not None:
                if refusal[0] == 413:
                    await _discard_body(receive, 8 * self.settings.max_body_bytes)
                await _send_json(send_observed, *refusal)
            else:
                await self.app(scope, receive, send_observed)
        except Exception:
            status["code"] = status["code"] or 500  # the outer error middleware answers 500
            finish()
            raise
        finally:
            finish("" if status["code"] else " (client disconnected)")

    def _refuse(self, scope: dict) -> tuple[int, dict, dict[str, str]] | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}  # values stay bytes
        if self._hosts is not None:
            host = host_name(headers.get("host", b"").decode("latin-1"))
            if host and host.lower() not in self._hosts:
                return 421, error_body(f"this server listens on loopback and does not answer for the host name "
                                       f"{host!r} (server flag --allowed-host {host} permits it)",
                                       "invalid_request_error", None, "misdirected_request"), {}
        if self._key is not None and scope.get("path", "").startswith(PROTECTED):
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                why = "no API key given" if not token else "the API key is not valid"
                return 401, error_body(f"{why}: send 'Authorization: Bearer <key>' (the server's --api-key)",
                                       "invalid_request_error", None, "invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        size = headers.get("content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.settings.max_body_bytes:
            return 413, body_too_large(self.settings), {}
        return None


def body_too_large(settings: ServerSettings) -> dict:
    return error_body(f"the request body is over the server's limit of {settings.max_body_mb:g} MB "
                      "(server flag --max-body-mb)", "invalid_request_error", None, "request_too_large")


async def _discard_body(receive: Any, cap: int) -> None:
    """Read (and drop) a refused body up to `cap` bytes, so the client can finish sending and read the
    413 rather than see its connection reset mid-upload."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_json(send: Any, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
