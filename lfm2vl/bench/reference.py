"""The reference side of `lfm2vl bench --compare transformers`: transformers' own processor and
generate() on the same checkpoint, image and prompt. It runs only as its own process (side.py);
nothing in the package imports it, so transformers stays optional (tests/test_layering.py)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..memory import unbound_kernel_caches
from .workload import INSTALL_REFERENCE, conversation, median_run, peak_gpu_mb, peak_rss_mb


def _import_transformers():
    unbound_kernel_caches()  # importing lfm2vl capped oneDNN's caches; the reference runs with torch's defaults
    try:
        torch.ops.torchvision.nms  # noqa: B018  (a torchvision built for this torch is already registered)
    except (AttributeError, RuntimeError):
        # A torchvision wheel beside a CPU torch registers its ops only if their schemas exist (the
        # image processor uses none of them).
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_transformers.lib = lib
    try:
        import torchvision  # noqa: F401
        import transformers
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_REFERENCE} ({e})") from e
    transformers.logging.set_verbosity_error()
    return transformers


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, _value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run(spec: dict[str, Any]) -> dict[str, Any]:
    tf = _import_transformers()
    from PIL import Image

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: torch.float32}[
        spec.get("dtype")]
    device = torch.device(spec["device"])
    t = time.perf_counter()
    processor = tf.AutoProcessor.from_pretrained(spec["model"])
    model = tf.AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - t
    timers = {"vision": 0.0, "start": 0.0}

    def now() -> float:  # a GPU's kernels run after their launch: wait for them, as our side does
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    if tower is not None:
        tower.register_forward_pre_hook(lambda *_: timers.__setitem__("start", now()))
        tower.register_forward_hook(lambda *_: timers.__setitem__("vision", timers["vision"] + now() - timers["start"]))
    n = spec["max_new_tokens"]
    runs = []
    for i in range(spec["warmup"] + spec["runs"]):
        timers["vision"] = 0.0
        start = time.perf_counter()
        image = Image.open(spec["image"]).convert("RGB")
        text = processor.apply_chat_template(conversation(str(spec["image"]), spec["prompt"]),
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[[image]], return_tensors="pt", **spec.get("image_settings", {}))
        inputs = inputs.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        prepared = time.perf_counter()
        streamer = _FirstToken()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        new = out.shape[1] - inputs["input_ids"].shape[1]
        first = streamer.first or end
        if i >= spec["warmup"]:
            runs.append({
                "preprocess_s": prepared - start, "vision_s": timers["vision"],
                "prefill_s": first - prepared - timers["vision"], "ttft_s": first - start,
                "decode_tok_s": (new - 1) / (end - first) if new > 1 and end > first else None,  # one token: no decode
                "total_s": end - start, "new_tokens": int(new), "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
                "crops": int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0,  # (crops, patches, 768)
            })
    best = median_run(runs)
    return {**best, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(device),
            "runs": [r["total_s"] for r in runs],
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "transformers": tf.__version__}
