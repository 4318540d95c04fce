"""The chat page (lfm2vl/server/ui/) in a real headless Chromium, driven by Playwright with the system's
browser, against a real `lfm2vl serve` process with the bundled model and an API key. What the page
shows is checked against what the server itself answers for the same request.

No browser is no skip: Playwright or Chromium missing, or Chromium failing to start, fails the tests with
the reason (.ci/run installs both). LFM2VL_CHROMIUM names another Chromium binary;
LFM2VL_UI_SCREENSHOT=docs/ui.png writes the README's screenshot from the first test.
"""

import base64
import json
import os
import re
import shutil
import threading
import time
import tomllib
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # as tests/test_server.py: no server without the serve extra
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_server import _serve as serve_process  # noqa: E402  (one way to start a server, for both files)

ROOT = Path(__file__).parent.parent
UI = ROOT / "lfm2vl/server/ui"
CIRCLE, TRIANGLE = ROOT / "examples/red_circle.png", ROOT / "examples/blue_triangle.png"
QUESTION = "what shape is in the image?"
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT_MS = 30_000  # the longest any step may take before the test fails


# -- the server ---------------------------------------------------------------------------------------------
@contextmanager
def _serve(*flags: str):
    """A real `lfm2vl serve` process (tests/test_server.py starts it), yielding its base URL."""
    with serve_process(*flags) as (base, _):
        yield base


@pytest.fixture(scope="module")
def server():
    # One slot and a one-request queue, so that a full queue is easy to reach.
    with _serve("--api-key", KEY, "--max-slots", "1", "--max-queue", "1") as base:
        yield base


def _get(base: str, path: str, headers: dict | None = None):
    """(status, headers, body bytes) of a raw GET, errors included."""
    req = urllib.request.Request(f"{base}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _chat(base: str, body: dict) -> tuple[int, dict]:
    """The server's own answer (not streamed) to a request body."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}" if s.labels else s.name: s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


CANCELLED = "lfm2vl_requests_finished_total{reason=cancelled}"


# -- the browser --------------------------------------------------------------------------------------------
def _chromium() -> str:
    for candidate in (os.environ.get("LFM2VL_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    pytest.fail("no Chromium found: apt-get install chromium (.ci/run does), or set LFM2VL_CHROMIUM")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the browser tests need Playwright for Python: pip install -e '.[test]' ({e})")
    executable = _chromium()
    with sync_playwright() as p:
        try:  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
            b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001 - whatever stops the browser is the reason the test fails
            pytest.fail(f"Chromium ({executable}) did not start: {e}")
        yield b
        b.close()


class Chat:
    """One tab on the page, with every chat request it sends (the body and headers) recorded."""

    def __init__(self, browser, base: str, key: str | None = KEY, viewport=(1000, 700), stored_key: bool = False):
        from playwright.sync_api import expect

        self.expect, self.base = expect, base
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        if stored_key:  # as if typed earlier in this tab: in session storage before the page loads
            self.context.add_init_script(f"sessionStorage.setItem('lfm2vl.apiKey', {json.dumps(KEY)})")
        self.page = self.context.new_page()
        self.sent: list[dict] = []
        self.problems: list[str] = []  # uncaught exceptions and CSP violations
        self.page.on("request", self._record)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: "Content Security Policy" in m.text and self.problems.append(m.text))
        self.page.set_default_timeout(WAIT_MS)
        self.page.goto(base + "/")
        self.expect(self.page.locator("#model-name")).to_contain_text("lfm2vl")  # /ui/config has loaded
        if key is not None:
            self.page.fill("#api-key", key)

    def _record(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.sent.append({"body": request.post_data_json, "headers": request.headers})

    def attach(self, *files) -> None:
        """Paths, or Playwright's {"name", "mimeType", "buffer"} payloads, through the file picker."""
        payloads = [{"name": f.name, "mimeType": "image/png", "buffer": f.read_bytes()} if isinstance(f, Path) else f
                    for f in files]  # (Playwright takes paths or payloads, not both at once)
        self.page.set_input_files("#file", payloads)

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answer(self, n: int):
        return self.page.locator("#log li.assistant").nth(n)

    def finished(self, n: int, status: str = "done"):
        """The n-th answer, once it has ended with `status` (done, stopped or failed)."""
        answer = self.answer(n)
        self.expect(answer).to_have_attribute("data-status", status)
        return answer

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems


@pytest.fixture
def chat(browser, server):
    c = Chat(browser, server)
    yield c
    c.close()


def _image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}}


# -- a conversation -----------------------------------------------------------------------------------------
def test_an_image_question_streams_its_answer_and_the_next_turn_carries_the_history(chat, server):
    page = chat.page
    with page.expect_file_chooser() as chooser:  # the Attach button opens the file picker
        page.get_by_role("button", name="Attach images").click()
    chooser.value.set_files(str(CIRCLE))
    chat.expect(page.locator("#attachments img")).to_have_attribute("alt", "red_circle.png")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        chat.ask(QUESTION)
    assert response.value.headers["content-type"].startswith("text/event-stream")  # streamed, as SSE
    first = chat.finished(0)
    assert first.locator(".text").inner_text() == "circle"
    sent = chat.sent[0]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": [_image_part(CIRCLE), {"type": "text", "text": QUESTION}]}]
    assert chat.sent[0]["headers"]["authorization"] == f"Bearer {KEY}"
    # The numbers under the answer are the server's usage for this request.
    status, expected = _chat(server, sent)
    assert status == 200 and expected["choices"][0]["message"]["content"] == "circle"
    usage = first.locator(".usage")
    chat.expect(usage).to_have_attribute("data-prompt-tokens", str(expected["usage"]["prompt_tokens"]))
    chat.expect(usage).to_have_attribute("data-completion-tokens", str(expected["usage"]["completion_tokens"]))
    assert re.search(r"first token \d+\.\d\d s", usage.inner_text()) and "tokens/s" in usage.inner_text()
    # The question and its thumbnail stay in the conversation; the composer is empty again.
    chat.expect(page.locator("#log li.user img")).to_have_attribute("alt", "red_circle.png")
    chat.expect(page.locator("#attachments li")).to_have_count(0)

    # A second turn, in the same chat: the first one goes with it as history.
    chat.ask("what color is the shape?")
    second = chat.finished(1)
    body = chat.sent[1]["body"]
    assert body["messages"] == [sent["messages"][0], {"role": "assistant", "content": "circle"},
                                {"role": "user", "content": "what color is the shape?"}]
    status, expected = _chat(server, body)
    assert status == 200 and second.locator(".text").inner_text() == expected["choices"][0]["message"]["content"] == "red"

    # An image waiting in the composer has a remove button.
    chat.attach(TRIANGLE)
    remove = page.get_by_role("button", name="Remove blue_triangle.png")
    chat.expect(remove).to_be_visible()
    if os.environ.get("LFM2VL_UI_SCREENSHOT"):  # the README's picture: mid-conversation
        page.fill("#prompt", "and in this one?")
        page.locator(".settings").evaluate("e => e.scrollTop = 0")
        page.screenshot(path=os.environ["LFM2VL_UI_SCREENSHOT"])
    remove.click()
    chat.expect(page.locator("#attachments li")).to_have_count(0)

    # New chat: the conversation is gone, and so is its history.
    page.get_by_role("button", name="New chat").click()
    chat.expect(page.locator("#log li")).to_have_count(0)
    chat.ask("hi")
    chat.finished(0)
    assert chat.sent[2]["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_a_corrupt_image_is_an_inline_error_and_the_chat_goes_on(chat, server):
    page = chat.page
    broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n not really a PNG"}
    chat.attach(CIRCLE, broken)  # two images in one message; the second cannot be decoded
    chat.expect(page.locator("#attachments img")).to_have_count(2)
    chat.ask(QUESTION)
    failed = chat.finished(0, "failed")
    body = chat.sent[0]["body"]
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "image_url", "text"]
    status, expected = _chat(server, body)  # the server's own words for it
    assert status == 400 and expected["error"]["code"] == "invalid_image"
    chat.expect(failed.locator(".error")).to_contain_text(expected["error"]["message"])
    chat.expect(failed.locator(".error")).to_contain_text("400 invalid_image")

    chat.attach(CIRCLE)
    chat.ask(QUESTION)
    assert chat.finished(1).locator(".text").inner_text() == "circle"
    # The failed turn is still on screen, but it was not sent as history.
    chat.expect(page.locator("#log li.user")).to_have_count(2)
    chat.expect(failed.locator(".error")).to_be_visible()
    assert chat.sent[1]["body"]["messages"] == [{"role": "user", "content": [_image_part(CIRCLE),
                                                                              {"type": "text", "text": QUESTION}]}]


def test_the_api_key_field(browser, server):
    chat = Chat(browser, server, key=None)  # the page and its settings load without the key
    try:
        page = chat.page
        chat.expect(page.locator("#api-key")).to_have_attribute("placeholder", "required by this server")
        chat.ask("hi")
        failed = chat.finished(0, "failed")
        chat.expect(failed.locator(".error")).to_contain_text("401 invalid_api_key")
        chat.expect(failed.locator(".error")).to_contain_text("no API key given")  # the server's message
        assert "authorization" not in chat.sent[0]["headers"]
        page.fill("#api-key", KEY)
        chat.ask("hi")
        chat.finished(1)
        assert chat.sent[1]["headers"]["authorization"] == f"Bearer {KEY}"
        assert chat.sent[1]["body"]["messages"] == [{"role": "user", "content": "hi"}]  # not the failed turn
        chat.expect(failed.locator(".error")).to_be_visible()
        # Kept for this tab only: session storage, nothing in local storage; a reload keeps it.
        assert page.evaluate("[sessionStorage.getItem('lfm2vl.apiKey'), localStorage.length]") == [KEY, 0]
        page.reload()
        chat.expect(page.locator("#api-key")).to_have_value(KEY)
    finally:
        chat.close()


# -- Stop, and a full queue ---------------------------------------------------------------------------------
def _long_answers(page) -> None:
    """The bundled model stops after a word or two: make this page's answers run until cancelled."""
    def keep_going(route) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", keep_going)


def test_stop_cancels_the_request_on_the_server(chat, server):
    page = chat.page
    _long_answers(page)
    page.fill("#max_tokens", "3000")
    before = _metrics(server)[CANCELLED]
    chat.ask("count")
    answer = chat.answer(0)
    chat.expect(answer.locator(".text")).to_have_text(re.compile(r".{8}", re.S))  # streaming, a token at a time
    assert chat.sent[0]["body"]["max_tokens"] == 3000  # the control reached the request
    stop = page.get_by_role("button", name="Stop")
    chat.expect(stop).to_be_visible()
    assert _metrics(server)["lfm2vl_active_requests"] == 1
    stop.click()
    chat.finished(0, "stopped")
    partial = answer.locator(".text").inner_text()
    # The server saw the connection close and cancelled the request: its slot is free again.
    assert _wait_for(lambda: _metrics(server)[CANCELLED] == before + 1)
    assert _wait_for(lambda: _metrics(server)["lfm2vl_active_requests"] == 0)
    chat.expect(stop).to_be_hidden()
    chat.expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.fill("#max_tokens", "2")
    chat.ask("hi")
    chat.finished(1)
    assert chat.sent[1]["body"]["messages"][1] == {"role": "assistant", "content": partial}  # kept as far as it got


def test_a_full_queue_is_an_inline_error(browser, chat, server):
    busy = Chat(browser, server)  # a second tab takes the one slot, a plain client the one queue place
    try:
        _long_answers(busy.page)
        busy.page.fill("#max_tokens", "3000")
        busy.ask("count")
        assert _wait_for(lambda: _metrics(server)["lfm2vl_active_requests"] == 1)
        queued = threading.Thread(target=_chat, args=(server, {"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 2}))
        queued.start()
        assert _wait_for(lambda: _metrics(server)["lfm2vl_queue_depth"] == 1)
        chat.ask("hi")
        failed = chat.finished(0, "failed")
        chat.expect(failed.locator(".error")).to_contain_text("503 queue_full")
        chat.expect(failed.locator(".error")).to_contain_text("--max-queue")  # the server's message
        chat.expect(failed.locator(".error")).to_contain_text("try again in 1 s")  # its Retry-After
        busy.page.get_by_role("button", name="Stop").click()
        busy.finished(0, "stopped")
        queued.join(30)
        chat.ask("hi")
        chat.finished(1)
    finally:
        busy.close()


# -- the controls -------------------------------------------------------------------------------------------
def test_controls_start_from_the_checkpoint_and_reach_the_request(chat, server):
    from lfm2vl.sampling import RECOMMENDED

    page = chat.page
    status, _, raw = _get(server, "/ui/config")
    config = json.loads(raw)
    processor = json.loads((ROOT / "lfm2vl/assets/bundled_model/processor_config.json").read_text())["image_processor"]
    for field in ("max_image_tokens", "do_image_splitting", "use_thumbnail"):
        assert config["image"][field] == processor[field]  # the bundled checkpoint's own settings
    assert config["sampling"]["recommended"]["min_p"] == RECOMMENDED.min_p
    assert config["api_key_required"] is True and config["model"] == "lfm2vl"
    chat.expect(page.locator("#max_image_tokens")).to_have_value(str(config["image"]["max_image_tokens"]))
    chat.expect(page.locator("#max_tiles")).to_have_value(str(config["image"]["max_tiles"]))
    assert page.is_checked("#do_image_splitting") is config["image"]["do_image_splitting"]
    assert page.is_checked("#use_thumbnail") is config["image"]["use_thumbnail"]
    chat.expect(page.locator("#max_tokens")).to_have_value(str(config["sampling"]["default"]["max_tokens"]))
    chat.expect(page.locator("#preset")).to_have_value("default")
    page.select_option("#preset", "recommended")
    for field in ("temperature", "min_p", "repetition_penalty"):
        assert float(page.input_value(f"#{field}")) == config["sampling"]["recommended"][field]
    page.fill("#temperature", "0.7")
    chat.expect(page.locator("#preset")).to_have_value("custom")
    page.get_by_role("button", name="Checkpoint defaults").click()
    chat.expect(page.locator("#preset")).to_have_value("default")

    # Unchanged controls send nothing (the server applies its defaults); changed ones go as request fields.
    chat.attach(CIRCLE, TRIANGLE)
    chat.ask("what shapes are in the images?")
    chat.finished(0)
    body = chat.sent[0]["body"]
    assert set(body) == {"model", "messages", "stream", "stream_options"}
    page.fill("#max_image_tokens", "16")  # under the checkpoint's minimum (36): the minimum follows
    page.check("#do_image_splitting")
    page.fill("#max_tiles", "4")
    page.select_option("#preset", "recommended")
    page.fill("#max_tokens", "3")
    chat.attach(CIRCLE)
    chat.ask(QUESTION)
    usage = chat.finished(1).locator(".usage")
    body = chat.sent[1]["body"]
    assert {k: body[k] for k in set(body) - {"model", "messages", "stream", "stream_options"}} == {
        "max_image_tokens": 16, "min_image_tokens": 16, "do_image_splitting": True, "max_tiles": 4,
        "temperature": RECOMMENDED.temperature, "min_p": RECOMMENDED.min_p,
        "repetition_penalty": RECOMMENDED.repetition_penalty, "max_tokens": 3}
    status, expected = _chat(server, body)
    assert status == 200
    chat.expect(usage).to_have_attribute("data-prompt-tokens", str(expected["usage"]["prompt_tokens"]))
    assert int(usage.get_attribute("data-completion-tokens")) <= 3
    # ... and the smaller image budget is what made the prompt shorter.
    status, unbudgeted = _chat(server, {k: v for k, v in body.items() if "image" not in k and "tiles" not in k})
    assert status == 200 and unbudgeted["usage"]["prompt_tokens"] > expected["usage"]["prompt_tokens"]


def test_drop_and_paste_attach_images(chat):
    page = chat.page
    data = base64.b64encode(CIRCLE.read_bytes()).decode()
    # A synthetic drop and paste, each carrying one PNG file and one text file (which is not attached).
    page.evaluate("""([data, kind]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], kind + ".png", {type: "image/png"}));
        files.items.add(new File(["hello"], "notes.txt", {type: "text/plain"}));
        const target = document.getElementById(kind === "dropped" ? "log" : "prompt");
        target.dispatchEvent(kind === "dropped" ? new DragEvent("drop", {dataTransfer: files, bubbles: true})
                                                : new ClipboardEvent("paste", {clipboardData: files, bubbles: true}));
    }""", [data, "dropped"])
    chat.expect(page.locator("#attachments img")).to_have_count(1)
    chat.expect(page.locator("#banner")).to_contain_text("notes.txt")
    page.evaluate("""([data, kind]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], kind + ".png", {type: "image/png"}));
        document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", {clipboardData: files, bubbles: true}));
    }""", [data, "pasted"])
    chat.expect(page.locator("#attachments img")).to_have_count(2)
    assert page.eval_on_selector_all("#attachments img", "els => els.map((e) => e.alt)") == ["dropped.png", "pasted.png"]
    chat.ask(QUESTION)
    chat.finished(0)
    assert [p["type"] for p in chat.sent[0]["body"]["messages"][0]["content"]] == ["image_url", "image_url", "text"]


def test_keyboard_labels_and_a_narrow_window(browser, server, chat):
    page = chat.page
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("two")
    assert page.input_value("#prompt") == "one\ntwo" and chat.sent == []  # Shift+Enter: a new line, nothing sent
    # Every control has an accessible name.
    unnamed = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label") && !e.textContent.trim())
        .map((e) => e.id || e.outerHTML)""")
    assert unnamed == []
    narrow = Chat(browser, server, key=None, viewport=(360, 640), stored_key=True)
    try:
        p = narrow.page
        assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        assert not p.locator("#settings").evaluate("e => e.open")  # folded, above the conversation
        narrow.expect(p.locator("#api-key")).to_have_value(KEY)
        for name in ("Send", "Attach images", "New chat"):
            narrow.expect(p.get_by_role("button", name=name)).to_be_in_viewport()
    finally:
        narrow.close()


# -- HTTP: headers, origins, the Host check, package data, --no-ui -----------------------------------------
def test_the_page_is_self_contained_and_guarded(server):
    for path, media in (("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        status, headers, _ = _get(server, path)
        assert status == 200 and headers["Content-Type"].startswith(media), path
        assert "default-src 'none'" in headers["Content-Security-Policy"] and "http" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, body = _get(server, "/", {"Host": "evil.example:8000"})
    assert status == 421 and b"--allowed-host" in body  # no DNS rebinding onto the page either
    # Nothing from other origins: no URLs with a host, no CSS imports; the HTML names only our files.
    for f in ("index.html", "app.js", "style.css"):
        text = (UI / f).read_text()
        assert not re.search(r"(https?:)?//[\w-]+\.[\w.-]+", text), f
        assert "@import" not in text and "url(" not in text, f
    html = (UI / "index.html").read_text()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"/ui/app.js", "/ui/style.css"}
    # A non-editable install ships the files: the package-data globs cover every one of them.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lfm2vl"]
    shipped = {p for pattern in patterns for p in (ROOT / "lfm2vl").glob(pattern)}
    assert {UI / f for f in ("index.html", "app.js", "style.css")} <= shipped


def test_no_ui_turns_the_page_off():
    with _serve("--no-ui") as base:
        for path in ("/", "/ui/app.js", "/ui/config"):
            status, _, body = _get(base, path)
            assert status == 404 and json.loads(body)["error"]["code"] == "not_found", path
        assert _get(base, "/v1/models")[0] == 200
