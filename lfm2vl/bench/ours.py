"""Our side of the benchmark, in its own process: the engine path every user call takes, timed in parts."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..quant import is_quantized
from .workload import conversation, median_run, peak_gpu_mb, peak_rss_mb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels(model: Any) -> dict[str, Any]:
    """The per-device kernel choices this run took (they differ between CPUs: compare machines by them)."""
    from .. import native
    from ..model.linear import float32_kernels, onednn_bfloat16
    from ..quant import AMX_WIDEN_ROWS, int4_block, int4_prompt_kernel, int8_matmul_available, int8_prompt_products

    out: dict[str, Any] = {"vision_patches_per_call": model.engine.vision_patches}
    if model.device.type == "cpu":
        out["float32_linear"] = float32_kernels()
        out["bfloat16_fused_epilogue"] = onednn_bfloat16()
        if model.quantization is not None:
            dtype = str(model.dtype).removeprefix("torch.")
            isa = native.isa()
            if not int8_matmul_available():
                out["int8_prompt_rows"] = ("lfm2vl native int8 x int8 GEMM (AVX2)"
                                           if isa and model.dtype == torch.float32 else
                                           f"widened to {dtype} (no VNNI or AMX, and no lfm2vl native GEMM for it)")
            elif int8_prompt_products(model.dtype, AMX_WIDEN_ROWS):  # only long chunks may widen
                out["int8_prompt_rows"] = "int8 x int8"
            else:
                out["int8_prompt_rows"] = f"int8 x int8 below {AMX_WIDEN_ROWS} rows, widened to {dtype} from {AMX_WIDEN_ROWS}"
            out["int8_decode_rows"] = f"lfm2vl native int8 x int8 ({isa})" if isa else f"torch GEMV ({native.why_not()})"
            if model.quantization == "int4":
                native_int4 = isa is not None and int4_block() in native.INT4_BLOCKS
                out["int4_decode_rows"] = f"lfm2vl native int4 x int8 ({isa})" if native_int4 else "torch int4 kernel"
                out["int4_prompt_rows"] = (f"lfm2vl native int4 x int8 ({isa})" if native_int4 and int4_prompt_kernel()
                                           and model.dtype == torch.float32 else f"widened to {dtype}")
            # what the run's decode steps took (lfm2vl/quant/step.py keeps a table once the C step ran)
            state = model.module.language_model.decode_state
            out["decode_step"] = ("one C call (lfm2vl/native/step.c)" if state is not None and state[1] is not None
                                  else "torch's layers")
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import lfm2vl

    t = time.perf_counter()
    model = lfm2vl.load(spec["model"], device=spec["device"], dtype=spec.get("dtype"), quantize=spec.get("quantize"))
    load_s = time.perf_counter() - t
    # One request at a time, nothing cached between runs: every run does the whole work.
    model.configure_engine(max_slots=1, image_cache_mb=0, prefix_cache_mb=0)
    timers = {"vision": 0.0, "pixels": 0.0}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            _sync(model.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(model.device)
            timers[name] += time.perf_counter() - start
            return out

        return wrapper

    model.module.encode_images = timed("vision", model.module.encode_images)
    n = spec["max_new_tokens"]

    def measure(image: str, settings: dict[str, Any], warmup: int, count: int) -> list[dict[str, Any]]:
        conv = conversation(image, spec["prompt"])
        opts = dict(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, **settings)
        return [r for i in range(warmup + count) if (r := one(conv, opts)) and i >= warmup]

    def one(conv: list[dict], opts: dict[str, Any]) -> dict[str, Any]:
        timers.update(vision=0.0, pixels=0.0)
        start = time.perf_counter()
        request = model.request(conv, **opts)  # reads and decodes the image file, renders and tokenizes
        prepared = time.perf_counter()
        for image in request.images:
            image.pixels = timed("pixels", image.pixels)  # resize, tiles and patches (the engine calls it)
        done = model.engine.submit(request).result()
        total = time.perf_counter() - start
        ttft = (prepared - start) + done.ttft_s
        preprocess = (prepared - start) + timers["pixels"]
        return {
            "preprocess_s": preprocess, "vision_s": timers["vision"], "prefill_s": ttft - preprocess - timers["vision"],
            "ttft_s": ttft, "total_s": total,
            "decode_tok_s": done.generation_tps if done.completion_tokens > 1 else None,  # one token: no decode
            "new_tokens": done.completion_tokens, "prompt_tokens": done.prompt_tokens,
            "image_tokens": sum(img.tokens for img in request.images),
            "crops": sum(len(img.plan.crops) for img in request.images),
        }

    if "sweep" in spec:
        rows = []
        for i, s in enumerate(spec["sweep"]):
            settings = {k: s[k] for k in ("max_image_tokens", "min_image_tokens")}
            r = measure(s["image"], settings, spec["warmup"] if i == 0 else 0, 1)[0]
            rows.append({"image_side": s["image_side"], **settings, **{k: r[k] for k in (
                "image_tokens", "crops", "ttft_s", "total_s")}})
        return {"sweep": rows, "peak_rss_mb": peak_rss_mb()}
    settings, predicted = spec.get("image_settings", {}), {}
    if spec.get("latency_target") is not None:  # the device-aware budget: calibrate (cached), choose, then time it
        choice = model.plan_budget(conversation(str(spec["image"]), spec["prompt"]), spec["latency_target"])
        settings = choice.settings
        predicted = {"predicted_ttft_s": choice.predicted_ttft_s, "image_settings": settings,
                     "latency_target_s": spec["latency_target"], "meets_target": choice.meets_target}
    runs = measure(str(spec["image"]), settings, spec["warmup"], spec["runs"])
    best = median_run(runs)
    return {**best, **predicted, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(model.device),
            "runs": [r["total_s"] for r in runs],
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "quantize": is_quantized(model.module),  # also set for an `lfm2vl quantize` checkpoint
            "kernels": kernels(model)}
