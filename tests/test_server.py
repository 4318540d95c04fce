"""`lfm2vl serve` driven by the official openai client (and raw HTTP where a client would hide the
status) over 127.0.0.1, against real server processes with the bundled model. Answers are compared
with the same requests run through `Model` in this process."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from PIL import Image  # noqa: E402

import lfm2vl  # noqa: E402

ROOT = Path(__file__).parent.parent
CIRCLE, TRIANGLE = ROOT / "examples/red_circle.png", ROOT / "examples/blue_triangle.png"
QUESTION = "what shape is in the image?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(*flags: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "serve", "--port", str(port), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LFM2VL_DEBUG": "", "LFM2VL_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    with _serve() as (base, _):
        yield base


@pytest.fixture(scope="module")
def local():
    return lfm2vl.load()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(path.read_bytes())}}


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def _client(base: str, key: str = "unused"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def _post(base: str, path: str, body: bytes | dict, headers: dict | None = None):
    """(status, headers, json body) of a raw POST, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _local_message(*images: Path, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": str(p)} for p in images),
                                        {"type": "text", "text": text}]}


def _remote_message(*images: Path, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*(_image_part(p) for p in images), {"type": "text", "text": text}]}


# -- the default server ------------------------------------------------------------------------------------
def test_chat_streamed_equals_non_streamed_and_usage(server, local):
    client = _client(server)
    messages = [_remote_message(CIRCLE)]
    r = client.chat.completions.create(model="lfm2vl", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == "circle" and r.choices[0].finish_reason == "stop"
    expected = local.complete([_local_message(CIRCLE)], max_new_tokens=8)[0]
    assert r.usage.prompt_tokens == expected.prompt_tokens  # image tokens included
    assert r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    stream = client.chat.completions.create(model="lfm2vl", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_multi_image_and_multi_turn_equal_the_local_model(server, local):
    client = _client(server)
    two = [_remote_message(CIRCLE, TRIANGLE, text="what shapes are in the images?")]
    r = client.chat.completions.create(model="lfm2vl", messages=two, max_tokens=12)
    expected = local.complete([_local_message(CIRCLE, TRIANGLE, text="what shapes are in the images?")],
                              max_new_tokens=12)[0]
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.prompt_tokens
    first = local.generate([_local_message(CIRCLE)], max_new_tokens=8)
    turns = [_remote_message(CIRCLE), {"role": "assistant", "content": first},
             _remote_message(TRIANGLE)]
    r = client.chat.completions.create(model="lfm2vl", messages=turns, max_tokens=8)
    local_turns = [_local_message(CIRCLE), {"role": "assistant", "content": first},
                   _local_message(TRIANGLE)]
    expected = local.complete(local_turns, max_new_tokens=8)[0]
    assert r.choices[0].message.content == expected.text  # (the tiny bundled model was trained on single turns)
    assert r.usage.prompt_tokens == expected.prompt_tokens


def test_sampling_fields_reach_the_engine(server, local):
    client = _client(server)
    messages = [{"role": "user", "content": "describe a red circle"}]
    kwargs = dict(model="lfm2vl", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    expected = local.generate(messages, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a == b == expected
    r = client.chat.completions.create(model="lfm2vl", messages=messages, max_tokens=5,
                                       extra_body={"ignore_eos": True, "min_tokens": 5, "top_k": 3})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="lfm2vl", messages=[_remote_message(CIRCLE)], max_tokens=4,
                                       extra_body={"max_image_tokens": 16, "min_image_tokens": 8})
    expected = local.complete([_local_message(CIRCLE)], max_new_tokens=4, max_image_tokens=16, min_image_tokens=8)
    assert r.usage.prompt_tokens == expected[0].prompt_tokens


def test_logprobs_are_the_models_log_probabilities(server, local):
    messages = [{"role": "user", "content": "what color is the sky?"}]
    r = _client(server).chat.completions.create(model="lfm2vl", messages=messages, max_tokens=6, logprobs=True,
                                                top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    # Token strings keep special tokens (ignore_eos lets <|im_end|> through); the text skips them.
    assert "".join(e.token for e in content).replace("<|im_end|>", "") == r.choices[0].message.content
    prompt = local.request(messages).ids
    generated = local.complete(messages, max_new_tokens=6, ignore_eos=True)[0].token_ids
    with torch.inference_mode():
        logits = local.module(torch.tensor([prompt + generated]))[0, len(prompt) - 1 : -1]
    expected = logits.float().log_softmax(-1)
    for step, entry in enumerate(content):
        assert entry.logprob == pytest.approx(expected[step, generated[step]].item(), abs=1e-4)
        top = expected[step].topk(3)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert bytes(entry.bytes).decode() == entry.token


def test_completions_endpoint(server, local):
    client = _client(server)
    prompt = "<|im_start|>user\nwhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model="lfm2vl", prompt=prompt, max_tokens=5, logprobs=2)
    req = local.text_request(prompt, max_new_tokens=5)
    expected = local.engine.submit(req).result()
    assert r.choices[0].text == expected.text and r.usage.prompt_tokens == len(req.ids) == expected.prompt_tokens
    assert r.choices[0].logprobs.tokens and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    stream = client.completions.create(model="lfm2vl", prompt=prompt, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text
    default = client.completions.create(model="lfm2vl", prompt="one two three", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    ids = client.completions.create(model="lfm2vl", prompt=req.ids, max_tokens=5)
    assert ids.choices[0].text == expected.text


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server):
    hi = [{"role": "user", "content": "hi"}]
    corrupt = {"type": "image_url", "image_url": {"url": _data_url(b"\x89PNG\r\n\x1a\n not really")}}
    cases = [  # (body, status, code or None)
        (dict(model="nope", messages=hi), 404, "model_not_found"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), 400, None),
        (dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}]}]), 400, "invalid_image_url"),
        (dict(messages=[{"role": "user", "content": [corrupt]}]), 400, "invalid_image"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(CIRCLE)}}]}]),
         400, "image_source_not_allowed"),
        (dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]), 400, "image_source_not_allowed"),
        (dict(messages=[_remote_message(*[CIRCLE] * 9)]), 400, "too_many_images"),
        (dict(messages=hi, max_tokens=0), 400, None),
        (dict(messages=hi, max_tokens=10**6), 400, "context_length_exceeded"),
        (dict(messages=[{"role": "user", "content": "word " * 5000}]), 400, "context_length_exceeded"),
        (dict(messages=hi, temperature=-1), 400, None),
        (dict(messages=hi, temperature="hot"), 400, None),
        (dict(messages=hi, top_p=2), 400, None),
        (dict(messages=hi, n=2), 400, None),
        (dict(messages=hi, presence_penalty=0.5), 400, "unsupported_parameter"),
        (dict(messages=hi, frobnicate=1), 400, "unknown_parameter"),
        (dict(messages=hi, top_logprobs=3), 400, None),
        (dict(messages=[]), 400, None),
        (dict(messages=hi, max_image_tokens="auto"), 400, None),  # auto needs latency_target
        (dict(messages=hi, max_image_tokens="auto", latency_target=-1), 400, None),
        (dict(messages=hi, max_image_tokens="lots"), 400, None),
    ]
    for body, status, code in cases:
        got, _, payload = _post(server, "/v1/chat/completions", body)
        assert got == status, (body, payload)
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], payload
        if code is not None:
            assert error["code"] == code, payload
    status, _, payload = _post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and payload["error"]["code"] == "invalid_json"
    status, _, payload = _post(server, "/v1/chat/completions", b"[" * 100000 + b"]" * 100000)
    assert status == 400 and payload["error"]["code"] == "invalid_json"  # deep nesting is not a crash
    status, _, payload = _post(server, "/v1/chat/completions", {"messages": hi, "stop_token_ids": [10**9]})
    assert status == 400 and "stop_token_ids" in payload["error"]["message"]
    status, _, payload = _post(server, "/v1/chat/completions", {"messages": hi}, {"Host": "evil.example:8000"})
    assert status == 421 and "--allowed-host" in payload["error"]["message"]  # no DNS rebinding onto loopback
    status, _, payload = _post(server, "/v1/chat/completions", {"messages": hi, "temperature": 1e-308, "max_tokens": 2})
    assert status == 200  # a vanishing temperature is greedy, not NaN
    status, _, payload = _post(server, "/v1/nothing-here", {})
    assert status == 404 and "error" in payload
    status, _, payload = _post(server, "/v1/completions", {"prompt": ["a", "b"]})
    assert status == 400 and payload["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:  # the official client sees the same body
        _client(server).chat.completions.create(model="lfm2vl", messages=[{"role": "user", "content": [corrupt]}])
    assert info.value.body["code"] == "invalid_image"
    ok = _client(server).chat.completions.create(model="lfm2vl", messages=[_remote_message(CIRCLE)], max_tokens=8)
    assert ok.choices[0].message.content == "circle"
    auto = _client(server).chat.completions.create(  # the device-aware budget (calibrates on first use)
        model="lfm2vl", messages=[_remote_message(CIRCLE)], max_tokens=8,
        extra_body={"max_image_tokens": "auto", "latency_target": 5.0})
    assert auto.choices[0].message.content == "circle"
    assert _client(server).models.list().data[0].id == "lfm2vl"
    assert _client(server).models.retrieve("lfm2vl").id == "lfm2vl"


def test_metrics_count_requests_tokens_and_cache_hits(server):
    before = _metrics(server)
    client = _client(server)
    for _ in range(2):
        r = client.chat.completions.create(model="lfm2vl", messages=[_remote_message(TRIANGLE)], max_tokens=8)
    after = _metrics(server)
    assert after["lfm2vl_requests_total"] - before["lfm2vl_requests_total"] == 2
    gained = after["lfm2vl_generation_tokens_total"] - before["lfm2vl_generation_tokens_total"]
    assert gained == 2 * r.usage.completion_tokens
    assert after["lfm2vl_prefix_cache_hits_total"] > before["lfm2vl_prefix_cache_hits_total"]  # the repeat
    key = "lfm2vl_http_requests_total{path=/v1/chat/completions,status=200}"
    assert after[key] - before.get(key, 0) == 2
    assert after["lfm2vl_queue_depth"] == 0 and after["lfm2vl_active_requests"] == 0
    assert after["lfm2vl_request_seconds_count"] >= 2
    for path in ("/v1/made-up-1", "/v1/made-up-2"):
        _post(server, path, {})
    labels = _metrics(server)
    assert not any("made-up" in k for k in labels) and labels["lfm2vl_http_requests_total{path=other,status=404}"] >= 2


def test_logprob_tokens_are_raw_bytes(local):
    from lfm2vl.server.protocol import token_string

    tt = local.processor.text_tokenizer
    ids = tt.encode("🦙 漢字 hello")
    raw = [tt.token_bytes(i) for i in ids]
    assert b"".join(raw).decode() == "🦙 漢字 hello"
    strings = [token_string(b) for b in raw]
    assert any(s.startswith("bytes:\\x") for s in strings) and "ll" in strings


# -- a locked-down server: API key, one slot, a one-request queue, small limits ---------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    (images / "circle.png").write_bytes(CIRCLE.read_bytes())
    flags = ["--api-key", "sesame", "--max-slots", "1", "--max-queue", "1", "--allowed-image-dir", str(images),
             "--max-images", "2", "--max-image-pixels", "40000", "--max-body-mb", "1"]
    with _serve(*flags) as (base, _):
        yield base, images


AUTH = {"Authorization": "Bearer sesame"}


def test_the_api_key_is_enforced(guarded):
    base, _ = guarded
    messages = [{"role": "user", "content": "hi"}]
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as info:
            _client(base, key or "x").chat.completions.create(model="lfm2vl", messages=messages, max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, headers, payload = _post(base, "/v1/chat/completions", {"messages": messages})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and payload["error"]["message"]
    assert _client(base, "sesame").chat.completions.create(model="lfm2vl", messages=messages, max_tokens=2).usage
    assert urllib.request.urlopen(f"{base}/health", timeout=5).status == 200  # health stays open


def test_limits_and_allowed_image_dir(guarded):
    base, images = guarded
    client = _client(base, "sesame")
    by_path = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(images / "circle.png")}},
                                           {"type": "text", "text": QUESTION}]}
    assert client.chat.completions.create(model="lfm2vl", messages=[by_path], max_tokens=8).choices[0].message.content \
        == "circle"
    outside = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(CIRCLE)}}]}
    status, _, payload = _post(base, "/v1/chat/completions", {"messages": [outside]}, AUTH)
    assert status == 403 and payload["error"]["code"] == "image_path_not_allowed"
    big = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(300, 200))}}]}
    status, _, payload = _post(base, "/v1/chat/completions", {"messages": [big]}, AUTH)
    assert status == 400 and payload["error"]["code"] == "image_too_large" and "60,000 pixels" in payload["error"]["message"]
    status, _, payload = _post(base, "/v1/chat/completions", {"messages": [_remote_message(CIRCLE, CIRCLE, TRIANGLE)]},
                               AUTH)
    assert status == 400 and payload["error"]["code"] == "too_many_images"
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}).encode()
    status, _, payload = _post(base, "/v1/chat/completions", huge, AUTH)
    assert status == 413 and payload["error"]["code"] == "request_too_large"


def _long_stream(base: str, chunks_before_close: int | None, out: dict, hold: threading.Event | None = None) -> None:
    """Stream a long answer; after N chunks stop reading, wait for `hold`, then close (None: read to the end)."""
    body = json.dumps({"messages": [{"role": "user", "content": "count"}], "max_tokens": 3000, "stream": True,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out["status"] = r.status
            n = 0
            for line in r:
                if line.startswith(b"data: "):
                    n += 1
                    if chunks_before_close is not None and n >= chunks_before_close:
                        if hold is not None:
                            hold.wait(60)
                        out["closed"] = True
                        return  # closes the connection mid-stream
            out["chunks"] = n
    except urllib.error.HTTPError as e:
        out["status"], out["headers"], out["body"] = e.code, e.headers, json.loads(e.read())


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_frees_the_slot_and_a_full_queue_answers_503(guarded):
    base, _ = guarded
    before = _metrics(base)["lfm2vl_requests_finished_total{reason=cancelled}"]
    first: dict = {}
    t = threading.Thread(target=_long_stream, args=(base, 5, first))
    t.start()
    t.join(60)
    assert first.get("closed"), first
    assert _wait_for(lambda: _metrics(base)["lfm2vl_requests_finished_total{reason=cancelled}"] == before + 1)
    assert _metrics(base)["lfm2vl_active_requests"] == 0
    # The one slot is free again: a request is served at once.
    r = _client(base, "sesame").chat.completions.create(model="lfm2vl", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=2)
    assert r.usage.completion_tokens >= 1
    # One request runs, one waits, the next gets 503 with Retry-After.
    runs: list[dict] = [{}, {}]
    hold = threading.Event()
    threads = [threading.Thread(target=_long_stream, args=(base, 3, out, hold)) for out in runs]
    threads[0].start()
    assert _wait_for(lambda: _metrics(base)["lfm2vl_active_requests"] == 1)
    threads[1].start()
    assert _wait_for(lambda: _metrics(base)["lfm2vl_queue_depth"] == 1)
    status, headers, payload = _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                     AUTH)
    assert status == 503 and headers["Retry-After"] == "1" and payload["error"]["code"] == "queue_full"
    hold.set()
    for t in threads:
        t.join(120)
    assert all(out.get("closed") for out in runs), runs
    assert _wait_for(lambda: _metrics(base)["lfm2vl_active_requests"] == 0 and _metrics(base)["lfm2vl_queue_depth"] == 0)


def test_sigterm_lets_the_running_request_finish(tmp_path):
    with _serve() as (base, proc):
        out: dict = {}
        body = json.dumps({"messages": [{"role": "user", "content": "count"}], "max_tokens": 200, "stream": True,
                           "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()

        def run() -> None:
            req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                lines = [json.loads(line[6:]) for line in r if line.startswith(b"data: {")]
            out["usage"] = lines[-1]["usage"]

        t = threading.Thread(target=run)
        t.start()
        assert _wait_for(lambda: _metrics(base)["lfm2vl_generation_tokens_total"] > 5)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert out["usage"]["completion_tokens"] == 200  # the in-flight request finished
        # uvicorn re-raises the signal once shut down, so the exit status says "terminated by SIGTERM".
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log and "Traceback" not in log, log


def test_serve_quantized_answers_as_the_quantized_model_does():
    local = lfm2vl.load(quantize="int8")
    messages = [{"role": "user", "content": [_image_part(CIRCLE), {"type": "text", "text": QUESTION}]}]
    expected = local.complete([{"role": "user", "content": [{"type": "image", "image": str(CIRCLE)},
                                                            {"type": "text", "text": QUESTION}]}], max_new_tokens=8)[0]
    with _serve("--quantize", "int8") as (base, _):
        r = _client(base).chat.completions.create(model="lfm2vl", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected.text and r.usage.completion_tokens == expected.completion_tokens
