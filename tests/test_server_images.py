"""The server's image sources within the operator's policy (lfm2vl/server/images.py), in process:
data URLs, allowed directories (symlinks cannot escape), remote fetches with byte, time and redirect
limits, and no loopback/private peers unless allowed."""

import base64
import http.server
import threading
import time
from pathlib import Path

import pytest

from lfm2vl.server.errors import ApiError
from lfm2vl.server.images import read_image
from lfm2vl.server.settings import ServerSettings

ROOT = Path(__file__).parent.parent
PNG = (ROOT / "examples/red_circle.png").read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/circle.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path.startswith("/hop"):
            n = int(self.path[4:])
            self.send_response(302)
            self.send_header("Location", "/circle.png" if n == 0 else f"/hop{n - 1}")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold while reading
            self.wfile.write(b"\0" * (3 * 2**20))
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"\0" * 100)
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/drip":  # a byte at a time: each read is quick, the whole never ends
            self.send_response(200)
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path == "/slow-headers":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _code(url, settings, status=400):
    with pytest.raises(ApiError) as info:
        read_image(url, settings, "messages[0].content[0].image_url")
    assert info.value.status == status and info.value.param == "messages[0].content[0].image_url"
    return info.value.code, info.value.message


def test_data_urls_always_work_and_bad_ones_are_named():
    s = ServerSettings()
    image = read_image("data:image/png;base64," + base64.b64encode(PNG).decode(), s, "p")
    assert tuple(image.shape) == (3, 64, 64)
    assert _code("data:image/png;base64,!!!", s)[0] == "invalid_image_url"
    assert _code("data:image/png," + "abc", s)[0] == "invalid_image_url"
    assert _code("data:image/png;base64," + base64.b64encode(b"not an image").decode(), s)[0] == "invalid_image"
    big = ServerSettings(max_image_mb=0.001)
    assert _code("data:image/png;base64," + base64.b64encode(PNG * 10).decode(), big)[0] == "image_too_large"
    small = ServerSettings(max_image_pixels=1000)
    code, message = _code("data:image/png;base64," + base64.b64encode(PNG).decode(), small)
    assert code == "image_too_large" and "4,096 pixels" in message


def test_local_files_only_under_allowed_dirs(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "circle.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    code, message = _code(str(allowed / "circle.png"), ServerSettings())
    assert code == "image_source_not_allowed" and "--allowed-image-dir" in message
    s = ServerSettings(allowed_image_dirs=(allowed,))
    assert read_image(str(allowed / "circle.png"), s, "p").shape[1] == 64
    assert read_image("circle.png", s, "p").shape[1] == 64  # relative to the allowed directory
    assert read_image((allowed / "circle.png").as_uri(), s, "p").shape[1] == 64
    assert _code(str(tmp_path / "secret.png"), s, 403)[0] == "image_path_not_allowed"
    assert _code(str(allowed / "link.png"), s, 403)[0] == "image_path_not_allowed"
    assert _code(str(allowed / ".." / "secret.png"), s, 403)[0] == "image_path_not_allowed"
    assert _code(str(allowed / "missing.png"), s)[0] == "invalid_image_url"
    assert _code("~root/x.png", s)[0] == "invalid_image_url"  # taken literally: no home-directory expansion
    second = tmp_path / "more"
    second.mkdir()
    (second / "b.png").write_bytes(PNG)
    both = ServerSettings(allowed_image_dirs=(allowed, second))
    assert read_image("b.png", both, "p").shape[1] == 64  # relative paths: every allowed directory is tried
    with pytest.raises(ValueError, match="not a directory"):
        ServerSettings(allowed_image_dirs=(tmp_path / "nope",))


def test_remote_images_are_off_by_default_and_never_reach_loopback_unless_allowed(origin):
    code, message = _code(f"{origin}/circle.png", ServerSettings())
    assert code == "image_source_not_allowed" and "--allow-remote-images" in message
    public_only = ServerSettings(allow_remote_images=True)
    code, message = _code(f"{origin}/circle.png", public_only)
    assert code == "image_url_forbidden" and "127.0.0.1" in message and "--allow-private-image-urls" in message
    code, _ = _code(f"http://localhost:{origin.rsplit(':', 1)[1]}/circle.png", public_only)
    assert code == "image_url_forbidden"


def test_remote_fetch_limits(origin):
    s = ServerSettings(allow_remote_images=True, allow_private_image_urls=True, image_fetch_max_redirects=3,
                       max_image_mb=1, image_fetch_timeout_s=0.5)
    assert read_image(f"{origin}/circle.png", s, "p").shape[1] == 64
    assert read_image(f"{origin}/hop2", s, "p").shape[1] == 64  # three redirects: allowed
    code, message = _code(f"{origin}/hop3", s)
    assert code == "image_fetch_failed" and "redirects" in message
    assert _code(f"{origin}/big", s)[0] == "image_too_large"
    assert _code(f"{origin}/slow", s)[0] == "image_fetch_timeout"
    assert _code(f"{origin}/to-file", s)[0] == "image_fetch_failed"
    code, message = _code(f"{origin}/missing", s)
    assert code == "image_fetch_failed" and "404" in message
    assert _code("ftp://example.com/x.png", s)[0] == "invalid_image_url"
    no_redirects = ServerSettings(allow_remote_images=True, allow_private_image_urls=True, image_fetch_max_redirects=0)
    assert "more than 0 redirects" in _code(f"{origin}/hop0", no_redirects)[1]


def test_the_fetch_time_limit_is_total(origin):
    s = ServerSettings(allow_remote_images=True, allow_private_image_urls=True, image_fetch_timeout_s=1.0)
    for path in ("/drip", "/slow-headers"):
        start = time.monotonic()
        assert _code(f"{origin}{path}", s)[0] == "image_fetch_timeout"
        assert time.monotonic() - start < 1.6, path  # not one timeout per read
    start = time.monotonic()
    with pytest.raises(ApiError):  # a request's own deadline comes first
        read_image(f"{origin}/drip", s, "p", deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 0.9


def test_embedded_ipv4_and_other_non_public_addresses_are_refused():
    import ipaddress

    from lfm2vl.server.images import _public

    for address in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.1",
                    "64:ff9b::a00:1", "2002:7f00:1::", "::127.0.0.1", "fc00::1", "224.0.0.1", "0.0.0.0"):
        assert not _public(ipaddress.ip_address(address)), address
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert _public(ipaddress.ip_address(address)), address


def test_only_common_image_formats_are_decoded():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    code, message = _code("data:image/png;base64," + base64.b64encode(eps).decode(), ServerSettings())
    assert code == "invalid_image" and "accepted formats" in message
