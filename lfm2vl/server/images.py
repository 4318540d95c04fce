"""An `image_url` from a request -> an RGB tensor, within the operator's policy (ServerSettings).

Sources: data: URLs (always); local paths and file:// URLs only under `allowed_image_dirs` (symlinks
resolved first, so a link cannot point out); http(s) URLs only with `allow_remote_images`, bounded in
bytes, total time and redirects, with proxies ignored and every connection's actual peer address
checked (so neither a redirect nor a DNS answer can reach loopback, private or link-local hosts unless
`allow_private_image_urls`). Every failure is an ApiError naming the content part and the remedy.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from ..processing import ImageError, ImageTooLarge, load_image
from .errors import ApiError
from .settings import ServerSettings

SOURCES_HELP = ("send the image inline as a data: URL ('data:image/png;base64,...'); local paths need the server "
                "flag --allowed-image-dir DIR, http(s) URLs need --allow-remote-images")


def read_image(url: str, settings: ServerSettings, param: str) -> torch.Tensor:
    """(3, H, W) uint8 for one image_url, or an ApiError (400) naming `param`."""
    data, what = image_bytes(url, settings, param)
    try:
        return load_image(data, settings.max_image_pixels)
    except ImageTooLarge as e:
        raise ApiError(400, f"{param} ({what}): {e}", param, "image_too_large") from e
    except ImageError as e:
        raise ApiError(400, f"{param} ({what}): {e}", param, "invalid_image") from e


def image_bytes(url: str, settings: ServerSettings, param: str) -> tuple[bytes, str]:
    """The encoded image bytes behind `url`, and a short description of where they came from."""
    if url.startswith("data:"):
        return _data_url(url, settings, param), "data URL"
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{param}: remote image URLs are disabled on this server; {SOURCES_HELP}", param,
                           "image_source_not_allowed")
        return fetch(url, settings, param), url[:100]
    if scheme == "file" or not scheme or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # C:\ is a path
        return _local_file(url, settings, param)
    raise ApiError(400, f"{param}: unsupported image URL scheme {scheme!r}; {SOURCES_HELP}", param, "invalid_image_url")


def _data_url(url: str, settings: ServerSettings, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: a data URL must look like 'data:image/png;base64,<bytes>' "
                       f"(got {header[:60]!r})", param, "invalid_image_url")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise ApiError(400, f"{param}: the image is over the server's limit of {settings.max_image_mb:g} MB",
                       param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: the data URL's payload is not valid base64 ({e})", param,
                       "invalid_image_url") from e


def _local_file(url: str, settings: ServerSettings, param: str) -> tuple[bytes, str]:
    if not settings.allowed_image_dirs:
        raise ApiError(400, f"{param}: local image paths are disabled on this server; {SOURCES_HELP}", param,
                       "image_source_not_allowed")
    if url.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{param}: file URLs must name this machine (file:///path)", param, "invalid_image_url")
        url = urllib.parse.unquote(parsed.path)
    given = Path(url).expanduser()
    candidates = [given] if given.is_absolute() else [d / given for d in settings.allowed_image_dirs]
    for candidate in candidates:
        path = candidate.resolve()  # symlinks and ".." resolved before the check
        if not any(path.is_relative_to(d) for d in settings.allowed_image_dirs):
            continue
        if not path.is_file():
            raise ApiError(400, f"{param}: no image file at {url!r}", param, "invalid_image_url")
        if path.stat().st_size > settings.max_image_bytes:
            raise ApiError(400, f"{param}: {url!r} is over the server's limit of {settings.max_image_mb:g} MB",
                           param, "image_too_large")
        try:
            return path.read_bytes(), f"file {url}"
        except OSError as e:
            raise ApiError(400, f"{param}: cannot read {url!r} ({e.strerror})", param, "invalid_image_url") from e
    dirs = ", ".join(str(d) for d in settings.allowed_image_dirs)
    raise ApiError(403, f"{param}: {url!r} is outside the allowed image directories ({dirs})", param,
                   "image_path_not_allowed")


# -- remote images ---------------------------------------------------------------------------------------
class ForbiddenAddress(OSError):
    pass


def _guarded_connect(allow_private: bool, address, *args, **kwargs) -> socket.socket:
    """socket.create_connection, then refuse the peer unless it is a public address (or private is allowed)."""
    sock = socket.create_connection(address, *args, **kwargs)
    peer = ipaddress.ip_address(sock.getpeername()[0])
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if not allow_private and (not peer.is_global or peer.is_multicast):
        sock.close()
        raise ForbiddenAddress(f"{address[0]} resolves to {peer}, a loopback, private or reserved address")
    return sock


class _GuardedHTTP(http.client.HTTPConnection):
    def __init__(self, *args, allow_private: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connect, allow_private)


class _GuardedHTTPS(http.client.HTTPSConnection):
    def __init__(self, *args, allow_private: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connect, allow_private)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTP, allow_private=self.allow_private), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def https_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPS, allow_private=self.allow_private), req,
                            context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int):
        super().__init__()
        self.max_redirections = limit

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl[:100]}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, settings: ServerSettings, param: str) -> bytes:
    """GET an image URL within the limits (bytes, total seconds, redirects, peer addresses)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler({}), _HTTPHandler(settings.allow_private_image_urls),
                    _HTTPSHandler(settings.allow_private_image_urls), _Redirects(settings.image_fetch_max_redirects),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    limit, deadline = settings.max_image_bytes, time.monotonic() + settings.image_fetch_timeout_s
    shown = url if len(url) <= 100 else url[:97] + "..."
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "lfm2vl-server", "Accept": "image/*"})
        with opener.open(request, timeout=settings.image_fetch_timeout_s) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limit:
                raise ApiError(400, f"{param}: {shown} is {int(size) / 2**20:.1f} MB, over the server's limit of "
                               f"{settings.max_image_mb:g} MB", param, "image_too_large")
            chunks, total = [], 0
            while chunk := response.read(65536):
                total += len(chunk)
                if total > limit:
                    raise ApiError(400, f"{param}: {shown} is over the server's limit of {settings.max_image_mb:g} MB",
                                   param, "image_too_large")
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            why = f"more than {settings.image_fetch_max_redirects} redirects" if "redirect" in str(e.msg) else e.msg
            raise ApiError(400, f"{param}: fetching {shown} failed: {why}", param, "image_fetch_failed") from e
        raise ApiError(400, f"{param}: fetching {shown} failed: HTTP {e.code} {e.msg}", param,
                       "image_fetch_failed") from e
    except urllib.error.URLError as e:
        reason = e.reason
        raise _fetch_error(e.reason, param, shown, settings) from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _fetch_error(e, param, shown, settings) from e


def _fetch_error(reason: object, param: str, shown: str, settings: ServerSettings) -> ApiError:
    if isinstance(reason, ForbiddenAddress):
        return ApiError(400, f"{param}: {shown} refused: {reason}; the server flag --allow-private-image-urls "
                        "permits such hosts", param, "image_url_forbidden")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return ApiError(400, f"{param}: fetching {shown} took longer than {settings.image_fetch_timeout_s:g} s",
                        param, "image_fetch_timeout")
    return ApiError(400, f"{param}: fetching {shown} failed: {reason}", param, "image_fetch_failed")
