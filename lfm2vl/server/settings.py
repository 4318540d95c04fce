"""What a server operator decides (`lfm2vl serve` flags): names, access, image sources and limits.

The defaults are safe on a laptop: listen on 127.0.0.1, accept images only inline (data: URLs), never
read local files or fetch URLs unless told to, and bound every request (body, images, pixels).
docs/serving.md lists the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str = "lfm2vl"
    api_key: str | None = None  # clients must send "Authorization: Bearer <key>" to /v1/*
    allowed_image_dirs: tuple[Path, ...] = ()  # local paths / file:// URLs are read only under these
    allow_remote_images: bool = False  # fetch http(s) image URLs
    allow_private_image_urls: bool = False  # ... including loopback, private and link-local addresses
    max_image_mb: float = 20.0  # per image, whatever its source
    image_fetch_timeout_s: float = 10.0  # whole download of one remote image
    image_fetch_max_redirects: int = 3
    max_images: int = 8  # per request
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked before decoding
    max_body_mb: float = 64.0  # request body (413 beyond)
    retry_after_s: int = 1  # sent with 503 when the queue is full
    # Listening on loopback: answer only requests whose Host is a loopback name or one of these (a web
    # page cannot reach the API through DNS rebinding). Off (None) when listening on other addresses.
    allowed_hosts: tuple[str, ...] | None = None
    ui: bool = True  # the chat page at / (lfm2vl/server/ui/); --no-ui turns it off (404)

    def __post_init__(self) -> None:
        checks = [
            (bool(self.served_model_name), "the served model name must not be empty"),
            (self.api_key is None or bool(self.api_key), "the API key must not be empty"),
            (self.max_image_mb > 0, "max_image_mb must be > 0"),
            (self.image_fetch_timeout_s > 0, "image_fetch_timeout_s must be > 0"),
            (self.image_fetch_max_redirects >= 0, "image_fetch_max_redirects must be >= 0"),
            (self.max_images >= 0, "max_images must be >= 0"),
            (self.max_image_pixels > 0, "max_image_pixels must be > 0"),
            (self.max_body_mb > 0, "max_body_mb must be > 0"),
            (self.retry_after_s >= 0, "retry_after_s must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        dirs = []
        for d in self.allowed_image_dirs:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--allowed-image-dir {d}: not a directory")
            dirs.append(path)
        object.__setattr__(self, "allowed_image_dirs", tuple(dirs))

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
