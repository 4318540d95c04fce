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
import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch

from ..processing import SAFE_FORMATS, ImageError, ImageTooLarge, load_image
from .errors import ApiError
from .settings import ServerSettings

SOURCES_HELP = ("send the image inline as a data: URL ('data:image/png;base64,...'); local paths need the server "
                "flag --allowed-image-dir DIR, http(s) URLs need --allow-remote-images")


def read_image(url: str, settings: ServerSettings, param: str, deadline: float | None = None) -> torch.Tensor:
    """(3, H, W) uint8 for one image_url, or an ApiError (400) naming `param`. Only common photo and
    screenshot formats are decoded (SAFE_FORMATS); `deadline` (time.monotonic()) bounds remote fetches."""
    data, what = image_bytes(url, settings, param, deadline)
    try:
        return load_image(data, settings.max_image_pixels, SAFE_FORMATS)
    except ImageTooLarge as e:
        raise ApiError(400, f"{param} ({what}): {e}", param, "image_too_large") from e
    except ImageError as e:
        raise ApiError(400, f"{param} ({what}): {e}", param, "invalid_image") from e


def image_bytes(url: str, settings: ServerSettings, param: str, deadline: float | None = None) -> tuple[bytes, str]:
    """The encoded image bytes behind `url`, and a short description of where they came from."""
    if url.startswith("data:"):
        return _data_url(url, settings, param), "data URL"
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{param}: remote image URLs are disabled on this server; {SOURCES_HELP}", param,
                           "image_source_not_allowed")
        return fetch(url, settings, param, deadline), url[:100]
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
    given = Path(url)  # never expanduser(): "~user" must not probe the server's accounts
    candidates = [given] if given.is_absolute() else [d / given for d in settings.allowed_image_dirs]
    allowed = [p for p in (c.resolve() for c in candidates)  # symlinks and ".." resolved before the check
               if any(p.is_relative_to(d) for d in settings.allowed_image_dirs)]
    if not allowed:
        raise ApiError(403, f"{param}: {url!r} is outside the server's allowed image directories", param,
                       "image_path_not_allowed")
    path = next((p for p in allowed if p.is_file()), None)
    if path is None:
        raise ApiError(400, f"{param}: no image file at {url!r}", param, "invalid_image_url")
    if path.stat().st_size > settings.max_image_bytes:
        raise ApiError(400, f"{param}: {url!r} is over the server's limit of {settings.max_image_mb:g} MB",
                       param, "image_too_large")
    try:
        return path.read_bytes(), f"file {url}"
    except OSError as e:
        raise ApiError(400, f"{param}: cannot read {url!r} ({e.strerror})", param, "invalid_image_url") from e


# -- remote images ---------------------------------------------------------------------------------------
class ForbiddenAddress(OSError):
    pass


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, also after unwrapping IPv4 embedded in IPv6 (mapped, 6to4, NAT64, ...)."""
    embedded = []
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64 or int(ip) < 2**32:  # NAT64 and IPv4-compatible (::a.b.c.d) carry IPv4 in the low bits
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(a.is_global and not a.is_multicast for a in [ip, *(e for e in embedded if e is not None)])


class _Fetch:
    """One download: its policy, and the sockets it opened (closed from outside when time is up)."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.sockets: list[socket.socket] = []
        self.expired = False

    def connect(self, address, timeout=None, source_address=None, *_args) -> socket.socket:
        """Resolve, refuse non-public addresses (unless allowed) before connecting, connect to a checked one."""
        host, port = address[0], address[1]
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        if not self.allow_private and not all(_public(ipaddress.ip_address(a[0].split("%")[0])) for _, a in addresses):
            raise ForbiddenAddress(f"{host} is not a public internet address")
        error: OSError | None = None
        for family, sockaddr in addresses:
            if self.expired:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            self.sockets.append(sock)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                sock.connect(sockaddr)  # the checked address itself: a second DNS answer cannot change it
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error or OSError(f"cannot connect to {host}")

    def expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a read waiting in the fetch thread
            except OSError:
                pass


def _connection(base: type, fetch: _Fetch) -> type:
    class Guarded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = fetch.connect

    return Guarded


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, fetch: _Fetch):
        super().__init__()
        self.connection = _connection(http.client.HTTPConnection, fetch)

    def http_open(self, req):
        return self.do_open(self.connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, fetch: _Fetch):
        super().__init__()
        self.connection = _connection(http.client.HTTPSConnection, fetch)

    def https_open(self, req):
        return self.do_open(self.connection, req, context=self._context)


class _TooManyRedirects(urllib.error.URLError):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.hops = limit, 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops += 1
        if self.hops > self.limit:
            raise _TooManyRedirects(f"more than {self.limit} redirects")
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to a non-http(s) URL ({newurl[:60]})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_FETCHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lfm2vl-image-fetch")  # bounded: slow hosts wait


def fetch(url: str, settings: ServerSettings, param: str, deadline: float | None = None) -> bytes:
    """GET an image URL within the limits: bytes, total time (connect, redirects and body together, and
    the request's `deadline` (time.monotonic()) if sooner), redirects, and public peer addresses."""
    shown = url if len(url) <= 100 else url[:97] + "..."
    end = time.monotonic() + settings.image_fetch_timeout_s
    end = min(end, deadline) if deadline is not None else end
    job = _Fetch(settings.allow_private_image_urls)
    future = _FETCHERS.submit(_download, url, settings, param, shown, job, end)
    try:
        return future.result(timeout=max(0.0, end - time.monotonic()))
    except FutureTimeout:
        job.expire()
        raise _fetch_error(TimeoutError(), param, shown, settings) from None


def _download(url: str, settings: ServerSettings, param: str, shown: str, job: _Fetch, end: float) -> bytes:
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler({}), _HTTPHandler(job), _HTTPSHandler(job),
                    _Redirects(settings.image_fetch_max_redirects), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    limit = settings.max_image_bytes
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "lfm2vl-server", "Accept": "image/*"})
        with opener.open(request, timeout=max(0.01, end - time.monotonic())) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limit:
                raise ApiError(400, f"{param}: {shown} is {int(size) / 2**20:.1f} MB, over the server's limit of "
                               f"{settings.max_image_mb:g} MB", param, "image_too_large")
            chunks, total = [], 0
            while chunk := response.read1(65536):
                total += len(chunk)
                if total > limit:
                    raise ApiError(400, f"{param}: {shown} is over the server's limit of {settings.max_image_mb:g} MB",
                                   param, "image_too_large")
                if time.monotonic() > end or job.expired:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except urllib.error.HTTPError as e:
        raise ApiError(400, f"{param}: fetching {shown} failed: HTTP {e.code} {e.msg}", param,
                       "image_fetch_failed") from e
    except urllib.error.URLError as e:
        raise _fetch_error(e.reason, param, shown, settings) from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _fetch_error(e, param, shown, settings) from e


def _fetch_error(reason: object, param: str, shown: str, settings: ServerSettings) -> ApiError:
    if isinstance(reason, ForbiddenAddress):
        return ApiError(400, f"{param}: {shown} refused: {reason}; the server flag --allow-private-image-urls "
                        "permits private hosts", param, "image_url_forbidden")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return ApiError(400, f"{param}: fetching {shown} took longer than {settings.image_fetch_timeout_s:g} s",
                        param, "image_fetch_timeout")
    return ApiError(400, f"{param}: fetching {shown} failed: {reason}", param, "image_fetch_failed")
