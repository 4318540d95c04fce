"""`lfm2vl serve` driven by the official openai client over 127.0.0.1, in a real server process."""

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LFM2VL_DEBUG": ""})
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
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _image_part(path):
    data = base64.b64encode((ROOT / path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_chat_streamed_equals_non_streamed_and_usage(server):
    import lfm2vl

    client = _client(server)
    messages = [{"role": "user", "content": [_image_part("examples/red_circle.png"),
                                             {"type": "text", "text": "what shape is in the image?"}]}]
    r = client.chat.completions.create(model="lfm2vl", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == "circle" and r.choices[0].finish_reason == "stop"
    model = lfm2vl.load()
    local = [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples/red_circle.png")},
                                          {"type": "text", "text": "what shape is in the image?"}]}]
    expected = model.complete(local, max_new_tokens=8)[0]
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    stream = client.chat.completions.create(model="lfm2vl", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "circle"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server):
    client = _client(server)
    cases = [
        (dict(model="nope", messages=[{"role": "user", "content": "hi"}]), openai.NotFoundError),
        (dict(model="lfm2vl", messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError),
        (dict(model="lfm2vl", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}]}]), openai.BadRequestError),
        (dict(model="lfm2vl", messages=[{"role": "user", "content": "hi"}], max_tokens=0), openai.BadRequestError),
        (dict(model="lfm2vl", messages=[{"role": "user", "content": "hi"}], temperature=-1), openai.BadRequestError),
    ]
    for kwargs, error in cases:
        with pytest.raises(error) as info:
            client.chat.completions.create(**kwargs)
        body = info.value.body
        assert set(body) >= {"message", "type", "param", "code"} and body["message"], body
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"{server}/v1/chat/completions", data=b"{not json"), timeout=10)
    assert info.value.code == 400 and "error" in json.loads(info.value.read())
    ok = client.chat.completions.create(model="lfm2vl", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ok.choices[0].message.content is not None
    assert client.models.list().data[0].id == "lfm2vl"
