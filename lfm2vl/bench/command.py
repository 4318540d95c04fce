"""`lfm2vl bench`: flags -> one measured process per side -> a table, ratios, one JSON line (docs/performance.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .workload import IMAGE_SIDE, INSTALL_REFERENCE, NEW_TOKENS, PRESETS, PROMPT

ROWS = (("preprocess_s", "preprocessing", "s"), ("vision_s", "vision", "s"), ("prefill_s", "LM prefill", "s"),
        ("ttft_s", "time to first token", "s"), ("predicted_ttft_s", "predicted TTFT", "s"), ("decode_tok_s", "decode", "tok/s"), ("total_s", "total", "s"),
        ("peak_rss_mb", "peak RSS", "MB"), ("peak_gpu_mb", "peak GPU memory", "MB"), ("load_s", "load", "s"),
        ("image_tokens", "image tokens", ""), ("crops", "crops", ""))
SWEEP_SIDES = (256, 512, 1024, 2048)
SWEEP_TOKENS = (64, 128, 256)


def add_parser(make: Any, add_model_args: Any, check_model_args: Any) -> None:
    b = make("bench", help="speed and memory on the announcement's workload (optionally against transformers)",
             description=f"Time one image ({IMAGE_SIDE}x{IMAGE_SIDE} unless --image), \"{PROMPT}\", exactly "
             f"{NEW_TOKENS} new tokens, batch 1, default image settings; each side runs in its own process. The "
             "last stdout line is one JSON object.")
    add_model_args(b, model_default="--preset 450M")
    b.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the full-size architecture with random weights, built once and cached (speed does not "
                   "depend on weight values) (default: 450M when --model is not given)")
    b.add_argument("--image", default=None, help=f"image file (default: a random {IMAGE_SIDE}x{IMAGE_SIDE} image)")
    b.add_argument("--prompt", default=PROMPT, help="(default: %(default)s)")
    b.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS, help="exactly this many (default: %(default)s)")
    b.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's, = cores)")
    b.add_argument("--runs", type=int, default=3, help="measured runs; the median is reported (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default: %(default)s)")
    b.add_argument("--compare", choices=("transformers",), default=None,
                   help="also run the reference on the same weights and inputs, and print the ratios")
    b.add_argument("--plot", default=None, metavar="PNG", help="draw time and memory bars (the announcement's "
                   "figures 3 and 4) into this file")
    b.add_argument("--latency-target", type=float, default=None, metavar="SECONDS",
                   help="use the device-aware image budget (max_image_tokens auto) for this time to first token, "
                   "and report its prediction beside the measurement (--compare runs the same budget)")
    b.add_argument("--sweep", action="store_true", help="also run the speed/quality knob: image side "
                   f"{list(SWEEP_SIDES)} x max image tokens {list(SWEEP_TOKENS)}")
    b.set_defaults(func=cmd_bench, _check_model_args=check_model_args)


def _run_side(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "lfm2vl.bench.side", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the {spec['system']} benchmark process ended without a result (exit {proc.returncode})")
    result = json.loads(lines[-1])
    if "error" in result:
        raise ValueError(f"{spec['system']}: {result['error']}")
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    from .workload import machine, preset_checkpoint, warm_file_cache, workload_image

    for name in ("max_new_tokens", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--warmup must be >= 0 and --threads >= 1")
    if args.latency_target is not None and not 0 < args.latency_target < float("inf"):
        raise ValueError("--latency-target must be a positive number of seconds")
    if args.latency_target is not None and args.sweep:
        raise ValueError("--sweep sets its own image budgets: drop --latency-target, or drop --sweep")
    if args.model is not None and args.preset is not None:
        raise ValueError("give --model or --preset, not both")
    if args.adapter is not None:
        raise ValueError("bench measures a checkpoint as saved: merge the adapter first (lfm2vl train writes model/)")
    if args.image is not None:
        args.image = str(_readable_image(args.image))
    if args.plot is not None:
        args.plot = str(_plot_path(args.plot))
    if args.threads is not None and args.threads > (os.cpu_count() or args.threads):
        print(f"warning: --threads {args.threads} is more than this machine's {os.cpu_count()} cores: the runs "
              "will be oversubscribed", file=sys.stderr)
    if args.sweep and args.image is not None:
        raise ValueError("--sweep times its own random images of each side: drop --image, or drop --sweep")
    if args.compare and args.model is not None:
        from ..weights import checkpoint_quantization

        if (stored := checkpoint_quantization(args.model)) is not None:
            raise ValueError(f"--compare transformers cannot read the {stored} checkpoint {args.model}: compare the "
                             f"float checkpoint with --quantize {stored}")
    if args.compare == "transformers" and importlib.util.find_spec("transformers") is None:
        raise ValueError(INSTALL_REFERENCE)
    args._check_model_args(args)
    import torch

    from ..api import parse_dtype

    dtype = parse_dtype(args.dtype)  # aliases (bf16, half, auto) -> the names both sides read
    dtype = None if dtype is None else str(dtype).removeprefix("torch.")
    info = machine(args.device)
    print(f"machine: {info.get('cpu')}; {info.get('cpu_flags', '')}; {info['cores']} cores; torch {info['torch']}"
          + (f"; GPU {info['gpu']}" if "gpu" in info else ""), file=sys.stderr)
    model = args.model or str(preset_checkpoint(args.preset or "450M"))
    if Path(model).is_dir():  # a Hub id is resolved (and downloaded) by each side
        print("(reading the checkpoint once: every load is then timed from the file cache)", file=sys.stderr)
        warm_file_cache(Path(model))
    with tempfile.TemporaryDirectory() as tmp:
        image = workload_image(args.image, Path(tmp))
        spec = {"model": model, "image": str(image), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                "device": args.device, "dtype": dtype, "threads": args.threads or torch.get_num_threads(),
                "quantize": args.quantize, "latency_target": args.latency_target,
                "runs": args.runs, "warmup": args.warmup}
        results = [_run_side({**spec, "system": "lfm2vl"})]
        if "image_settings" in results[0]:
            spec["image_settings"] = results[0]["image_settings"]  # the reference runs the budget ours chose
            print(f"image budget for a {args.latency_target:g} s target: {results[0]['image_settings']}",
                  file=sys.stderr)
        if args.compare:
            results.append(_run_side({**spec, "system": "transformers", "latency_target": None,
                                      "dtype": reference_dtype(dtype, results[0], args.device)}))
        sweep = _sweep(spec, Path(tmp)) if args.sweep else None
    _print_table(results, args)
    if "kernels" in results[0]:
        print("kernels: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in results[0]["kernels"].items()))
    summary = _summary(results, info, args, model)
    if sweep is not None:
        summary["sweep"] = sweep
    print(json.dumps(summary))  # before the plot: a failure to draw loses no measurement
    if args.plot:
        from .plot import plot_bars

        plot_bars(results, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def reference_dtype(asked: str | None, ours: dict[str, Any], device: str) -> str:
    """The reference runs the dtype ours ran (a bf16 checkpoint stays bf16 on a GPU for both), except that
    a quantized model on a CPU is measured against float32, the issue's baseline for --quantize."""
    import torch

    if asked is not None:
        return asked
    if ours.get("quantize") and torch.device(device).type == "cpu":
        return "float32"
    return ours["dtype"]


def _readable_image(path: str) -> Path:
    """--image, checked before any model loads: a file PIL can decode within the processor's limits."""
    from ..processing import ImageError, load_image_file

    try:
        load_image_file(path)
    except ImageError as e:
        raise ValueError(f"--image {path}: {e}") from e
    return Path(path).expanduser()


def _plot_path(path: str) -> Path:
    """--plot, checked before the runs: an existing folder and an image format PIL can write."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.resolve().parent.is_dir():
        raise ValueError(f"--plot {path}: its folder does not exist")
    if p.is_dir():
        raise ValueError(f"--plot {path}: is a folder; give a file name such as bars.png")
    savable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if p.suffix.lower() not in savable:
        raise ValueError(f"--plot {path}: not an image file name PIL can write; end it with .png (or .jpg, .webp)")
    return p


def _sweep(spec: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Image side x max image tokens, one process, one measured run per setting (after a warm-up)."""
    from .workload import workload_image

    settings = [{"image": str(workload_image(None, tmp, side)), "image_side": side, "max_image_tokens": tokens,
                 "min_image_tokens": min(64, tokens)} for side in SWEEP_SIDES for tokens in SWEEP_TOKENS]
    rows = _run_side({**spec, "system": "lfm2vl", "sweep": settings, "runs": 1, "warmup": 1})["sweep"]
    for r in rows:
        print(f"  sweep {r['image_side']}x{r['image_side']}, max_image_tokens {r['max_image_tokens']}: "
              f"{r['image_tokens']} image tokens in {r['crops']} crops, TTFT {r['ttft_s']:.3f} s, "
              f"total {r['total_s']:.3f} s", file=sys.stderr)
    return rows


def _print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    names = [_name(r) for r in results]
    print(f"{args.max_new_tokens} new tokens, {results[0]['threads']} threads, median of {args.runs} run(s)")
    print(f"{'':<22}" + "".join(f"{n:>22}" for n in names) + ("  ratio (> 1: lfm2vl better)" if len(results) > 1 else ""))
    for key, label, unit in ROWS:
        values = [r.get(key) for r in results]
        if key == "peak_gpu_mb" and all(v is None for v in values):
            continue  # a CPU run
        cells = "".join(f"{_fmt(v, unit):>22}" for v in values)
        ratio = ""
        if len(results) == 2 and all(isinstance(v, (int, float)) and v for v in values) and unit:
            ratio = f"  {values[0] / values[1]:.2f}x" if unit == "tok/s" else f"  {values[1] / values[0]:.2f}x"
        print(f"{label:<22}{cells}{ratio}")


def _name(r: dict[str, Any]) -> str:
    return f"{r['system']} {r['dtype']}" + (f" {r['quantize']}" if r.get("quantize") else "")


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit:
        return f"{value:.1f} {unit}"
    return str(value)


def _summary(results: list[dict[str, Any]], info: dict, args: argparse.Namespace, model: str) -> dict[str, Any]:
    ours = results[0]
    out = {"model": model, "preset": args.preset or (None if args.model else "450M"), "machine": info,
           **{k: ours.get(k) for k in ("total_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "peak_gpu_mb", "load_s",
                                       "preprocess_s", "vision_s", "prefill_s", "image_tokens", "crops", "dtype",
                                       "quantize", "threads")}}
    for key in ("predicted_ttft_s", "image_settings", "latency_target_s", "meets_target", "kernels"):
        if key in ours:
            out[key] = ours[key]
    if len(results) == 2:
        ref = results[1]
        out.update(ref_total_s=ref["total_s"], ref_ttft_s=ref["ttft_s"], ref_decode_tok_s=ref["decode_tok_s"],
                   ref_peak_rss_mb=ref["peak_rss_mb"], ref_dtype=ref["dtype"], transformers=ref.get("transformers"),
                   speedup=round(ref["total_s"] / ours["total_s"], 3),
                   rss_ratio=round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3), ref_load_s=ref.get("load_s"),
                   ref_peak_gpu_mb=ref.get("peak_gpu_mb"), ref_crops=ref.get("crops"))
        if ours.get("peak_gpu_mb") and ref.get("peak_gpu_mb"):
            out["gpu_memory_ratio"] = round(ours["peak_gpu_mb"] / ref["peak_gpu_mb"], 3)
    return out
