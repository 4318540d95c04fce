"""`lfm2vl serve`: flags -> ServerSettings + EngineConfig (both checked before the model loads) -> uvicorn."""

from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import sys
from typing import Any


def add_parser(make: Any, add_model_args: Any, check_model_args: Any, load_model: Any) -> None:
    """Register `serve` with `make(name, **kw)` (an argparse subparsers' add_parser); the CLI passes its
    model flags, their checks and its loader (which applies --adapter)."""
    v = make("serve", help="OpenAI-compatible HTTP server (docs/serving.md)",
                       description="Serve the model over OpenAI's API: POST /v1/chat/completions, /v1/completions; "
                       "GET /v1/models, /health, /metrics; a chat page at /. Defaults are safe on a laptop: 127.0.0.1 "
                       "only, inline (data: URL) images only.")
    add_model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface (default: %(default)s)")
    v.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    v.add_argument("--served-model-name", default="lfm2vl", help="the model id clients send (default: %(default)s)")
    v.add_argument("--api-key", default=os.environ.get("LFM2VL_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LFM2VL_API_KEY, else none)")
    v.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="on a loopback --host, also answer requests for this Host name, e.g. behind a reverse proxy "
                   "(repeatable; default: loopback names only, against DNS rebinding)")
    i = v.add_argument_group("image sources and limits")
    i.add_argument("--allowed-image-dir", action="append", default=[], metavar="DIR",
                   help="allow local paths and file:// URLs under DIR (repeatable; default: none)")
    i.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    i.add_argument("--allow-private-image-urls", action="store_true",
                   help="let remote image URLs reach loopback, private and link-local addresses")
    i.add_argument("--max-image-mb", type=float, default=20.0, help="per image, any source (default: %(default)s)")
    i.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds for one remote image (default: %(default)s)")
    i.add_argument("--max-images", type=int, default=8, help="images per request (default: %(default)s)")
    i.add_argument("--max-image-pixels", type=int, default=50_000_000, help="width x height per image (default: %(default)s)")
    i.add_argument("--max-body-mb", type=float, default=64.0, help="request body size; 413 beyond (default: %(default)s)")
    e = v.add_argument_group("engine")
    e.add_argument("--max-slots", type=int, default=None,
                   help="requests generating at once (default: 8 on CPU, 32 on GPU)")
    e.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; 503 beyond (default: %(default)s)")
    e.add_argument("--token-budget", type=int, default=None, help="tokens per engine step (default: 512 on CPU, 2048 on GPU)")
    e.add_argument("--image-cache-mb", type=float, default=None,
                   help="image-feature cache; 0 = off (default: 256 on CPU, 1024 on GPU, at most 1/16 of its free memory)")
    e.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="prompt-state cache; 0 = off (default: 512 on CPU, 4096 on GPU, at most 1/8 of its free memory)")
    v.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    v.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (default: served)")
    v.set_defaults(func=cmd_serve, _check_model_args=check_model_args, _load_model=load_model)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
        from .settings import ServerSettings
    except ImportError as e:
        raise OSError(f"serving needs FastAPI, uvicorn and prometheus_client ({e}): pip install 'lfm2vl[serve]'") from e
    from ..engine import EngineConfig

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=args.api_key,
        allowed_image_dirs=tuple(args.allowed_image_dir), allow_remote_images=args.allow_remote_images,
        allow_private_image_urls=args.allow_private_image_urls, max_image_mb=args.max_image_mb,
        image_fetch_timeout_s=args.image_fetch_timeout, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, max_body_mb=args.max_body_mb,
        allowed_hosts=tuple(args.allowed_host) if _loopback(args.host) else None,
        ui=not args.no_ui,
    )
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    overrides = {k: v for k, v in dict(max_slots=args.max_slots, token_budget=args.token_budget,
                                       image_cache_mb=args.image_cache_mb, prefix_cache_mb=args.prefix_cache_mb,
                                       max_queue=args.max_queue).items() if v is not None}
    args._check_model_args(args)
    EngineConfig(**overrides)  # checked before the model loads
    model = args._load_model(args)
    engine_config = EngineConfig.for_device(args.device, **overrides)  # a GPU's caches sized with the weights on it
    model.configure_engine(engine_config)
    app = create_app(model, settings)
    if not _loopback(args.host) and settings.api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    page = "" if args.no_ui else f"; chat page: http://{args.host}:{args.port}/"
    print(f"lfm2vl serving {model.source} as {settings.served_model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({engine_config.max_slots} slots){page}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=_log_config(not args.no_access_log))
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_config(access: bool) -> dict:
    """uvicorn's logging config plus our "lfm2vl" loggers (the access line comes from lfm2vl.server)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["lfm2vl"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    if not access:
        config["loggers"]["lfm2vl.server"] = {"handlers": ["default"], "level": "WARNING", "propagate": False}
    return config
