"""`lfm2vl bench`: runs each side in its own process and ends with one JSON line; --compare runs the
reference on the same checkpoint and inputs; --plot and --sweep produce what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import reference

ROOT = Path(__file__).parent.parent
BUNDLED = ROOT / "lfm2vl/assets/bundled_model"
KEYS = {"total_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "preprocess_s", "vision_s", "prefill_s",
        "image_tokens", "crops", "machine"}


def _bench(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "bench", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_bench_reports_every_part_and_ends_with_json(tmp_path):
    out, r = _bench("--model", BUNDLED, "--runs", "2", "--warmup", "0", "--max-new-tokens", "5",
                    "--plot", tmp_path / "bars.png", "--sweep")
    assert KEYS <= set(out) and out["image_tokens"] == 36 and out["crops"] == 1
    assert out["ttft_s"] >= out["preprocess_s"] > 0 and out["total_s"] >= out["ttft_s"]
    assert "cpu" in out["machine"] and "time to first token" in r.stdout
    from lfm2vl.model.linear import float32_kernels

    assert out["kernels"]["float32_linear"] == float32_kernels() and "kernels: " in r.stdout
    assert out["kernels"]["vision_patches_per_call"] == 1024 and "int8_prompt_rows" not in out["kernels"]
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    assert len(out["sweep"]) == 12 and {row["max_image_tokens"] for row in out["sweep"]} == {64, 128, 256}
    assert all(row["image_tokens"] <= row["max_image_tokens"] for row in out["sweep"])


def test_compare_runs_the_reference_on_the_same_inputs(tmp_path):
    folder = tmp_path / "tiny"
    reference.make_reference_checkpoint(folder, seed=3)
    out, r = _bench("--model", folder, "--runs", "1", "--warmup", "0", "--max-new-tokens", "6",
                    "--compare", "transformers", timeout=900)
    assert {"ref_total_s", "ref_peak_rss_mb", "speedup", "rss_ratio"} <= set(out)
    assert out["speedup"] == pytest.approx(out["ref_total_s"] / out["total_s"], rel=1e-2)
    assert "transformers float32" in r.stdout
    # a dtype alias reaches both sides as its name; one new token has no decode speed to report
    out, r = _bench("--model", folder, "--runs", "1", "--warmup", "0", "--max-new-tokens", "1", "--dtype", "bf16",
                    "--compare", "transformers", timeout=900)
    assert out["dtype"] == out["ref_dtype"] == "bfloat16" and "transformers bfloat16" in r.stdout
    assert out["decode_tok_s"] is None and out["ref_decode_tok_s"] is None
    import torch

    from lfm2vl.engine.config import vision_batch_patches

    assert out["kernels"]["vision_patches_per_call"] == vision_batch_patches(torch.device("cpu"), torch.bfloat16)


def test_bench_argument_errors_are_one_line():
    for args, phrase in ((("--runs", "0"), "--runs must be >= 1"), (("--image", "nope.png"), "--image nope.png"),
                         (("--model", BUNDLED, "--preset", "450M"), "--model or --preset"),
                         (("--sweep", "--image", ROOT / "examples/red_circle.png"), "--sweep times its own"),
                         (("--plot", "/no/such/dir/x.png"), "--plot"), (("--plot", "bars.txt"), "end it with .png"),
                         (("--plot", ROOT), "is a folder"), (("--image", ROOT), "is a directory"),
                         (("--image", ROOT / "README.md"), "--image")):
        r = subprocess.run([sys.executable, "-m", "lfm2vl", "bench", *map(str, args)], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and phrase in r.stderr, r.stderr
