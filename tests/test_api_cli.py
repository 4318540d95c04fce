"""The Python API (`generate`, `stream`, `complete`) and the CLI, end to end on a tiny checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lfm2vl
import reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    ref = reference.make_reference_checkpoint(folder, seed=11, text=dict(initializer_range=0.3))
    img = folder / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(img)
    return folder, ref, lfm2vl.load(folder), img


def _msgs(img, text="What is in this image?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": text}]}]


def test_generate_matches_reference_greedy_through_our_processor(setup):
    folder, ref, model, img = setup
    proc = reference.load_reference_processor(folder)
    text = proc.apply_chat_template(_msgs(img), add_generation_prompt=True)
    inputs = proc(text=[text], images=[[Image.open(img)]], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    if 7 in new:
        new = new[: new.index(7)]
    expected = proc.decode(new, skip_special_tokens=True)
    result = model.complete(_msgs(img), max_new_tokens=24)[0]
    assert result.token_ids == new
    assert result.text == expected
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.finish_reason == ("stop" if len(new) < 24 else "length")


def test_generate_shapes_and_batch(setup):
    _, _, model, img = setup
    one = model.generate(_msgs(img), max_new_tokens=8)
    assert isinstance(one, str)
    many = model.generate([_msgs(img), [{"role": "user", "content": "Hello there"}]], max_new_tokens=8)
    assert isinstance(many, list) and len(many) == 2 and many[0] == one
    assert model.generate("Hello there", max_new_tokens=8) == many[1]
    assert model.generate(_msgs(img), max_new_tokens=8, temperature=0) == one


def test_stream_concatenation_equals_generate(setup):
    _, _, model, img = setup
    pieces = list(model.stream(_msgs(img), max_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == model.generate(_msgs(img), max_new_tokens=20)


def test_stop_string_and_finish_reasons(setup):
    _, _, model, img = setup
    full = model.complete(_msgs(img), max_new_tokens=30, ignore_eos=True)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip() and "\ufffd" not in stop
    cut = model.complete(_msgs(img), max_new_tokens=30, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(model.stream(_msgs(img), max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert streamed == cut.text


def test_per_call_image_settings_change_the_prompt(setup):
    _, _, model, img = setup
    small = model.complete(_msgs(img), max_new_tokens=1, max_image_tokens=64)[0].prompt_tokens
    large = model.complete(_msgs(img), max_new_tokens=1)[0].prompt_tokens
    counts = model.processor.count_image_tokens(320, 240), model.processor.count_image_tokens(320, 240, max_image_tokens=64)
    assert large - small == counts[0] - counts[1] > 0


def test_seeded_sampling_and_presets(setup):
    _, _, model, img = setup
    a = model.generate(_msgs(img), max_new_tokens=12, temperature=1.0, seed=5)
    assert a == model.generate(_msgs(img), max_new_tokens=12, temperature=1.0, seed=5)
    p = model.sampling_params("recommended")
    assert (p.temperature, p.min_p, p.repetition_penalty) == (0.1, 0.15, 1.05)
    assert model.sampling_params().greedy  # generation_config.json has no sampling fields


def test_bad_options_are_clear_errors(setup):
    _, _, model, img = setup
    with pytest.raises(TypeError, match="unknown option"):
        model.generate(_msgs(img), temprature=0.5)
    with pytest.raises(ValueError, match="max_image_tokens|min_image_tokens"):
        model.generate(_msgs(img), min_image_tokens=300, max_image_tokens=100)
    with pytest.raises(ValueError, match="context"):
        model.generate(_msgs(img), max_new_tokens=10**6)
    with pytest.raises(TypeError):
        list(model.stream([_msgs(img), _msgs(img)]))


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lfm2vl", *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_generate(setup):
    folder, _, model, img = setup
    r = _cli("generate", "--model", str(folder), "--image", str(img), "--prompt", "What is in this image?",
             "--max-new-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = model.complete(_msgs(img), max_new_tokens=16)[0]
    assert out["text"] == expected.text and out["completion_tokens"] == len(expected.token_ids)
    streamed = _cli("generate", "--model", str(folder), "--image", str(img), "--prompt", "What is in this image?",
                    "--max-new-tokens", "16", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == expected.text + "\n"
    bad = _cli("generate", "--model", str(folder), "--image", str(folder / "missing.png"), "--prompt", "x")
    assert bad.returncode == 2 and "missing.png" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_chat_through_stdin(setup):
    folder, _, model, img = setup
    script = f"Hello\n/image {img}\nWhat is in this image?\n/image /no/such.png\n/reset\nHello\n/quit\n"
    r = _cli("chat", "--model", str(folder), "--max-new-tokens", "8", stdin=script)
    assert r.returncode == 0, r.stderr
    first = model.generate([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_new_tokens=8)
    second = model.generate(
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}, {"role": "assistant", "content": first},
         {"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "What is in this image?"}]}],
        max_new_tokens=8,
    )
    # stdout holds the replies only: the second saw the first turn and the image; /reset starts over
    assert r.stdout.splitlines() == [first, second, first], r.stdout
    assert "error: /image /no/such.png: no such file" in r.stderr
