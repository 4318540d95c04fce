"""`lfm2vl bench`: runs each side in its own process and ends with one JSON line; --compare runs the
reference on the same checkpoint and inputs; --plot and --sweep produce what they promise."""

import json
import os
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
    assert out["ref_crops"] == out["crops"] >= 1 and out["load_s"] > 0 and out["ref_load_s"] > 0
    assert out["peak_gpu_mb"] is None and out["ref_peak_gpu_mb"] is None and "peak GPU memory" not in r.stdout
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


def test_the_reference_runs_the_dtype_ours_ran():
    from lfm2vl.bench.command import reference_dtype

    assert reference_dtype(None, {"dtype": "bfloat16", "quantize": None}, "cuda") == "bfloat16"  # a bf16 checkpoint
    assert reference_dtype(None, {"dtype": "bfloat16", "quantize": "int8"}, "cuda:0") == "bfloat16"
    assert reference_dtype(None, {"dtype": "bfloat16", "quantize": "int8"}, "cpu") == "float32"  # the baseline
    assert reference_dtype("float16", {"dtype": "float16", "quantize": None}, "cpu") == "float16"


def test_bench_quantized_with_a_latency_target_reports_its_prediction(tmp_path):
    env_cache = {"LFM2VL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "lfm2vl", "bench", "--model", str(BUNDLED), "--quantize", "int8",
                        "--latency-target", "30", "--runs", "1", "--warmup", "0", "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **env_cache})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["quantize"] == "int8" and out["latency_target_s"] == 30 and out["meets_target"] is True
    assert 0 < out["predicted_ttft_s"] < 30 and out["image_settings"]["max_image_tokens"] >= out["image_tokens"]
    assert "int8_decode_rows" in out["kernels"] and (tmp_path / "cache/calibration.json").exists()


def test_compare_without_transformers_says_how_to_install_it():
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'transformers' else real(name, *a); "
            "from lfm2vl.cli import main; sys.exit(main(['bench', '--compare', 'transformers']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "pip install transformers torchvision" in r.stderr, r.stderr
