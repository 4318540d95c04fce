"""A minimal OpenAI-compatible chat client on the standard library (the package does not depend on `openai`).

Used for `--endpoint` (the model under test behind `lfm2vl serve`, vLLM or llama-server) and for
`--judge-endpoint` (the LLM that grades MMVet / MM-IFEval answers).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class EndpointError(RuntimeError):
    """An endpoint could not be reached or kept failing; the message names the URL and the cause."""


def chat_url(base: str) -> str:
    """http://host:port, http://host:port/v1 or the full .../chat/completions URL -> the latter."""
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


@dataclass(frozen=True)
class ChatClient:
    url: str  # as the user gave it
    model: str
    api_key: str | None = None
    timeout: float = 600.0
    retries: int = 4  # on connection errors, 429 and 5xx; 4xx others are the request's fault and fail at once

    def complete(self, messages: list[dict], **params: Any) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = chat_url(self.url)
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())
                return reply["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code != 429 and e.code < 500 or attempt == self.retries:
                    raise EndpointError(f"{url}: HTTP {e.code}: {detail}") from e
                wait = float(e.headers.get("Retry-After") or delay)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                if attempt == self.retries:
                    raise EndpointError(f"{url}: {getattr(e, 'reason', e)} (is the server running?)") from e
                wait = delay
            except (KeyError, IndexError, ValueError) as e:
                raise EndpointError(f"{url}: not an OpenAI chat completion reply ({e})") from e
            time.sleep(wait)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def models(self) -> list[str]:
        """The served model ids (GET /v1/models); fails fast, before any generation, when the server is down."""
        base = chat_url(self.url).removesuffix("/chat/completions")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(base + "/models", headers=headers), timeout=30) as r:
                return [m["id"] for m in json.loads(r.read()).get("data", [])]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise EndpointError(f"{base}/models: HTTP {e.code}: set the API key (docs/evaluation.md)") from e
            return []  # some servers have no /models; the first request will tell
        except (ValueError, KeyError, TypeError):
            return []
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"{self.url}: cannot connect ({getattr(e, 'reason', e)}): is the server running?") from e


def image_part(source: str) -> dict:
    """An image source (data: URL or file path) as an OpenAI image_url part (files sent as data: URLs)."""
    if not source.startswith("data:"):
        from .data import data_url

        with open(source, "rb") as f:
            source = data_url(f.read())
    return {"type": "image_url", "image_url": {"url": source}}


def to_openai(messages: list[dict]) -> list[dict]:
    """Our conversation parts ({"type": "image", "image": src}) -> OpenAI's (image_url with a data: URL)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(m)
            continue
        parts = [image_part(p["image"]) if p.get("type") == "image" else p for p in content]
        out.append({"role": m["role"], "content": parts})
    return out
