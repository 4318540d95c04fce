"""The `lfm2vl` executable as users meet it, driven in subprocesses: every user error is one `error:`
line with exit status 2 (before any weights are read when the arguments are at fault), flags are
honoured or refused, never dropped, and the chat recovers from failed turns and long sessions."""

import fcntl
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import lfm2vl
from lfm2vl.cli import build_parser, main
from lfm2vl.train import Stage, TrainConfig

ROOT = Path(__file__).parent.parent
CIRCLE = ROOT / "examples/red_circle.png"
QUESTION = "what shape is in the image?"


def _cli(*args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lfm2vl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "LFM2VL_DEBUG": "", **(env or {})})


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def unreadable_ckpt(tmp_path_factory):
    """A checkpoint folder whose weights cannot be read: an error about anything else came first."""
    folder = tmp_path_factory.mktemp("unreadable")
    bundled = Path(lfm2vl.__file__).parent / "assets/bundled_model"
    for f in bundled.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    (folder / "model.safetensors").write_bytes(b"these are not weights")
    return folder


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, color_data):
    folder = tmp_path_factory.mktemp("recipes")
    TrainConfig(output_dir=str(folder / "out"), stages=(Stage(data=(str(color_data),), steps=3),)).save(folder / "one.json")
    TrainConfig(output_dir=str(folder / "out"), stages=(Stage(data=(str(color_data),), steps=1, name="a"),
                                                        Stage(data=(str(color_data),), steps=1, name="b"))).save(
        folder / "two.json")
    return folder


def test_argument_errors_are_one_line_before_the_weights_load(unreadable_ckpt, recipes, color_data, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.delenv("LFM2VL_DEBUG", raising=False)
    m = ("--model", unreadable_ckpt)
    cases = [  # (argv, a phrase the error must contain)
        (("generate", *m, "--prompt", "hi", "--device", "cuda"), "--device: device 'cuda' is not available"),
        (("generate", *m, "--prompt", "hi", "--device", "cuda:0"), "cuda:0"),
        (("generate", *m, "--prompt", "hi", "--device", "mps"), "device 'mps' is not available"),
        (("generate", *m, "--prompt", "hi", "--device", "banana"), "unknown device 'banana'"),
        (("chat", *m, "--device", "cuda"), "--device"),
        (("eval", *m, "--task", "easyvqa", "--device", "cuda:1"), "--device"),
        (("serve", *m, "--device", "mps"), "--device"),
        (("train", "--data", color_data, "-o", tmp_path / "o", "--device", "cuda"), "device 'cuda' is not available"),
        (("generate", *m, "--prompt", "hi", "--dtype", "float8"), "--dtype: unknown dtype 'float8'"),
        (("generate", *m, "--prompt", "hi", "--temperature", "inf"), "--temperature must be a finite number"),
        (("generate", *m, "--prompt", "hi", "--temperature", "nan"), "--temperature must be a finite number"),
        (("generate", *m, "--prompt", "hi", "--top-p", "0"), "--top-p must be in (0, 1]"),
        (("generate", *m, "--prompt", "hi", "--max-new-tokens", "-5"), "--max-new-tokens must be >= 1"),
        (("chat", *m, "--max-new-tokens", "-5"), "--max-new-tokens must be >= 1"),
        (("generate", *m, "--prompt", "hi", "--min-image-tokens", "300"), "--min-image-tokens (300) > --max-image-tokens"),
        (("generate", *m, "--prompt", "hi", "--tile-size", "100"), "--tile-size"),
        (("generate", *m, "--prompt", "hi", "--resample", "lanczos"), "invalid choice: 'lanczos'"),
        (("generate", *m, "--prompt", "hi", "--stop-token-ids", "x"), "invalid int value: 'x'"),
        (("generate", *m, "--prompt", "hi", "--stop-token-ids", "7", "999999"), "--stop-token-ids 999999: this model's"),
        (("generate", *m, "--prompt", "hi", "--json", "--stream"), "not allowed with argument --json"),
        (("generate", *m, "--prompt", "hi", "--image", "nope.png"), "--image nope.png: no such file"),
        (("generate", *m, "--prompt", "hi", "--image", "abcd"), "--image abcd: no such file"),
        (("generate", *m, "--prompt", "hi", "--image", "examples"), "--image examples: is a directory"),
        (("generate", *m, "--prompt", "hi", "--image", "README.md"), "not a recognised image format"),
        (("generate", *m, "--prompt", "hi", "--adapter", tmp_path), "no adapter_config.json"),
        (("generate", "--model", "no-such-folder", "--prompt", "hi"), "--model no-such-folder: no such folder"),
        (("generate", *m), "the following arguments are required: --prompt"),
        (("generate", *m, "--prompt", "hi", "--frobnicate"), "unrecognized arguments: --frobnicate"),
        (("eval", *m, "--task", "easyvqa", "--limit", "-3"), "--limit must be >= 1"),
        (("eval", *m, "--task", "easyvqa", "--limit", "0"), "--limit must be >= 1"),
        (("eval", *m, "--task", "easyvqa", "--batch-size", "0"), "--batch-size must be >= 1"),
        (("eval", *m, "--task", "easyvqa", "--split", "val"), "--split val"),
        (("eval", *m, "--task", "nope"), "invalid choice: 'nope'"),
        (("serve", *m, "--port", "0"), "--port must be in 1..65535"),
        (("serve", *m, "--max-queue", "0"), "--max-queue must be >= 1"),
        (("serve", *m, "--allowed-image-dir", tmp_path / "nope"), "not a directory"),
        (("train", "--recipe", recipes / "one.json", "--data", color_data), "either --recipe or --data"),
        (("train", "--recipe", recipes / "two.json", "--lr", "0.5"), "--lr would change every stage"),
        (("train", "--data", color_data, "-o", tmp_path / "o", "--lora-r", "4"), "add --lora"),
        (("train", "--data", tmp_path / "missing.jsonl", "-o", tmp_path / "o"), "missing.jsonl: no such file"),
        (("train", "--steps", "3"), "needs --data FILE and --output DIR"),
    ]
    # Every case through main() in this process (fast), and one of each class through the executable.
    for argv, phrase in cases:
        capsys.readouterr()
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors exit from parse_args
            status = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert phrase in lines[0], (argv, lines[0])
        assert "safetensors" not in lines[0], (argv, lines[0])  # the (unreadable) weights were never opened
    for i in (0, 5, 9, 18, 19, 25, 27, 32, 35):
        argv, phrase = cases[i]
        assert phrase in _one_error_line(_cli(*argv, timeout=60)), argv
    assert "safetensors" in _one_error_line(_cli("generate", *m, "--prompt", "hi"))  # they are unreadable indeed


def test_a_real_bug_is_one_line_unless_debug(monkeypatch, capsys):
    def broken(_args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr("lfm2vl.cli.generate.cmd_generate", broken)
    monkeypatch.delenv("LFM2VL_DEBUG", raising=False)
    assert main(["generate", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: internal error (RuntimeError: something inside broke)") and "--debug" in err
    assert err.count("\n") == 1
    with pytest.raises(RuntimeError):
        main(["generate", "--prompt", "hi", "--debug"])


def test_help_shows_every_flag_with_its_default_and_a_version():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert not p.description or "argparse front" not in p.description, name
        for action in p._actions:
            if action.dest in ("help", "debug") or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            default = action.default
            if default not in (None, False, [], argparse_suppress()):
                assert "default" in action.help, f"{name} {action.option_strings[0]} hides its default {default!r}"
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lfm2vl {lfm2vl.__version__}"
    r = _cli("train", "--help")
    assert r.returncode == 0 and "argparse front" not in r.stdout and "Fine-tune" in r.stdout


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_generate_json_timing_stdin_prompt_and_new_options():
    r = _cli("generate", "--image", CIRCLE, "--prompt", "-", "--json", stdin=QUESTION + "\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == "circle" and out["finish_reason"] == "stop"
    assert set(out) >= {"prompt_tokens", "completion_tokens", "ttft_s", "total_s", "tokens_per_s"}
    assert out["ttft_s"] > 0 and out["total_s"] >= out["ttft_s"]
    r = _cli("generate", "--image", CIRCLE, "--prompt", QUESTION, "--json", "--ignore-eos", "--min-new-tokens", "4",
             "--max-new-tokens", "4")
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 4 and out["finish_reason"] == "length"
    model = lfm2vl.load()
    eos = model.processor.eos_token_id
    r = _cli("generate", "--image", CIRCLE, "--prompt", QUESTION, "--json", "--stop-token-ids",
             str(model.complete(_msgs(), max_new_tokens=1)[0].token_ids[0]))
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 0 and out["finish_reason"] == "stop" and eos is not None
    settings = dict(tile_size=256, max_pixels_tolerance=1.5, resample="bicubic", max_image_tokens=32,
                    min_image_tokens=16)
    r = _cli("generate", "--image", CIRCLE, "--prompt", QUESTION, "--json", "--tile-size", "256",
             "--max-pixels-tolerance", "1.5", "--resample", "bicubic", "--max-image-tokens", "32",
             "--min-image-tokens", "16")
    assert json.loads(r.stdout)["prompt_tokens"] == model.complete(_msgs(), max_new_tokens=1, **settings)[0].prompt_tokens


def _msgs(text=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": str(CIRCLE)}, {"type": "text", "text": text}]}]


def test_recipe_flags_are_applied_and_printed_and_adapters_load(recipes, tiny_train_ckpt, tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--recipe", recipes / "one.json", "--model", tiny_train_ckpt, "--lora", "--lora-r", "2",
             "--lr", "0.5", "--steps", "2", "-o", out, "--batch-size", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "overridden by flags" in r.stderr and "lr=0.5" in r.stderr and "steps=2" in r.stderr
    assert "trained 2 steps" in r.stdout and (out / "adapter" / "adapter_config.json").exists()
    common = ("--prompt", "hello", "--json", "--max-new-tokens", "6", "--ignore-eos")
    merged = _cli("generate", "--model", out / "model", *common)
    adapted = _cli("generate", "--model", tiny_train_ckpt, "--adapter", out / "adapter", *common)
    base = _cli("generate", "--model", tiny_train_ckpt, *common)
    assert merged.returncode == adapted.returncode == 0, adapted.stderr
    assert json.loads(adapted.stdout)["text"] == json.loads(merged.stdout)["text"]
    assert json.loads(base.stdout)["text"] != json.loads(merged.stdout)["text"]  # lr 0.5 changed the model


def test_inference_refuses_what_training_refuses():
    model = lfm2vl.load()
    for conv, phrase in (([{"role": "robot", "content": "hi"}], "role 'robot'"),
                         ([{"role": "user"}], "has no content"),
                         ([{"role": "user", "content": None}], "has no content"),
                         ([{"role": "user", "content": []}], "has no content")):
        with pytest.raises(ValueError, match=phrase):
            model.request(conv)


def test_chat_recovers_from_a_failed_turn_and_outgrows_the_context(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(CIRCLE.read_bytes()[:60])
    spaced = tmp_path / "my circle.png"
    shutil.copy(CIRCLE, spaced)
    too_long = "word " * 5000  # one message over the context of 4,096: that turn fails, the chat goes on
    script = (f"/image {corrupt}\n{QUESTION}\n/image \"{spaced}\"\n{QUESTION}\n{too_long}\n"
              "what color is the shape?\n/image\n/nonsense\n")
    r = _cli("chat", stdin=script)
    assert r.returncode == 0, r.stderr
    model = lfm2vl.load()
    turns, expected = [], []
    for message in ({"role": "user", "content": QUESTION}, _msgs()[0],
                    {"role": "user", "content": "what color is the shape?"}):
        turns.append(message)
        expected.append(model.generate(turns))
        turns.append({"role": "assistant", "content": expected[-1]})
    # The corrupt image was never attached, the failed turn left no trace, the good image went with turn 2.
    assert r.stdout.splitlines() == expected, (r.stdout, r.stderr)
    assert "corrupt.png" in r.stderr and "more than the model's context" in r.stderr
    assert "usage: /image PATH" in r.stderr and "unknown command /nonsense" in r.stderr
    long_turn = "describe the shape " + "and its colour " * 250 + "\n"  # ~1,000 tokens a turn
    r = _cli("chat", "--max-new-tokens", "4", stdin=long_turn * 8)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 8  # every turn answered
    assert "oldest" in r.stderr and "/reset" in r.stderr


def _pty_chat(keys: bytes) -> tuple[int, str]:
    """Run `lfm2vl chat` in a pseudo-terminal; send `keys` at the first prompt."""
    master, slave = pty.openpty()
    def controlling_terminal():  # so that Ctrl-C on the terminal sends SIGINT, as in a real shell
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "chat"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, close_fds=True, preexec_fn=controlling_terminal)
    os.close(slave)
    out, deadline, sent_at, sent_len = b"", time.monotonic() + 60, None, 0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            # at the prompt; again if nothing came back within 3 s: a key typed before the line editor set
            # the terminal up can be discarded by it (seen under load), and the chat then waits forever
            quiet = sent_at is not None and len(out) == sent_len and time.monotonic() - sent_at > 3
            if out.endswith(b"> ") and (sent_at is None or quiet) and proc.poll() is None:
                os.write(master, keys)
                sent_at, sent_len = time.monotonic(), len(out)
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_chat_on_a_terminal_ends_on_a_fresh_line():
    rc, out = _pty_chat(b"\x04")  # Ctrl-D
    assert rc == 0 and out.endswith("\r\n"), repr(out[-40:])
    rc, out = _pty_chat(b"\x03")  # Ctrl-C
    assert rc == 130 and out.endswith("\r\n"), repr(out[-40:])


def test_generate_quantized_equals_the_api():
    for scheme in ("int8", "int4"):
        r = _cli("generate", "--image", CIRCLE, "--prompt", QUESTION, "--quantize", scheme, "--json",
                 "--max-new-tokens", "6")
        assert r.returncode == 0, r.stderr
        expected = lfm2vl.load(quantize=scheme).complete(_msgs(), max_new_tokens=6)[0]
        out = json.loads(r.stdout)
        assert out["text"] == expected.text and out["completion_tokens"] == expected.completion_tokens
