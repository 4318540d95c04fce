"""The chat page at / (docs/serving.md, "The web page"): index.html, app.js and style.css beside this file,
shipped as package data, plus GET /ui/config, the checkpoint's defaults the page starts from.

The page is a client of our own /v1/chat/completions like any other: it sends the API key itself (the
middleware guards /v1/ only, so the page and its config load without one). Its files are read once, at
start-up, and served from a fixed table, so no request path ever reaches the file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from ...api import Model
from ..settings import ServerSettings

HERE = Path(__file__).parent
# url -> (file, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Everything from this origin, nothing from anywhere else (the page works offline); no inline script or
# style; images only from data: URLs (the thumbnails of attached files); no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
IMAGE_FIELDS = ("min_image_tokens", "max_image_tokens", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail")


def page_config(model: Model, settings: ServerSettings) -> dict[str, Any]:
    """What the page's controls start from: the checkpoint's image budget and sampling defaults, the model
    card's preset, and the server's limits. Request field names, so the page sends them back unchanged."""
    image = model.processor.settings

    def sampling(preset: str | None) -> dict[str, Any]:
        p = model.sampling_params(preset)
        return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                "repetition_penalty": p.repetition_penalty, "max_tokens": p.max_new_tokens}

    return {"model": settings.served_model_name, "max_model_len": model.engine.max_len,
            "api_key_required": settings.api_key is not None, "max_images": settings.max_images,
            "image": {k: getattr(image, k) for k in IMAGE_FIELDS},
            "sampling": {"default": sampling(None), "recommended": sampling("recommended")}}


def router(model: Model, settings: ServerSettings) -> APIRouter:
    files = {url: ((HERE / name).read_bytes(), media) for url, (name, media) in FILES.items()}
    config = page_config(model, settings)  # fixed for the server's life: read once
    r = APIRouter()

    def serve(url: str) -> None:
        body, media = files[url]

        async def get() -> Response:
            return Response(body, media_type=media, headers=HEADERS)

        r.add_api_route(url, get, methods=["GET"], include_in_schema=False)

    for url in files:
        serve(url)

    @r.get("/ui/config", include_in_schema=False)
    async def ui_config() -> dict:
        return config

    return r
