"""The device-aware image budget: `max_image_tokens="auto"` with `latency_target=SECONDS`.

The user-tunable speed/quality knob (min/max image tokens, tiling, number of tiles, thumbnail) made
automatic: a short calibration of this device measures what vision and prefill cost (docs/performance.md),
and each request gets the largest image budget whose *predicted* time to first token meets the target.

Cost model (fitted by `calibrate`, each term measured through the engine as every request runs):
- prefill: p0 + p1 * tokens (text and image tokens together);
- vision: c + v1 * n per call of n patches, crops grouped into calls as the engine groups them (one
  512 x 512 tile per call, two for bf16 on AMX: engine/config.py). The per-call cost is what a
  crop-per-crop model missed: on a 2-core Xeon with AMX one 1,024-patch crop measured 0.41 s alone,
  while five in three calls took 0.93 s (int4 450M; docs/performance.md). A crop holds at most 1,024
  patches, where the encoder's attention is a small part of its cost, so no quadratic term.

Candidates run from the checkpoint's own settings down: tiling with max_tiles from the default to
min_tiles, then one crop with max_image_tokens from the default down to min_image_tokens in steps of 32.
The result is cached per model, device (and GPU model), dtype, quantization, thread count, CPU and torch version in
~/.cache/lfm2vl/calibration.json (`$LFM2VL_CACHE` or `$XDG_CACHE_HOME` moves it); `recalibrate=True` measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cpu import cache_root, cpu_name
from .processing.tiling import TilePlan

TOKEN_STEP = 32  # the single-crop ladder: max_image_tokens from the default down in these steps


@dataclass(frozen=True)
class Calibration:
    prefill_fixed_s: float  # p0
    prefill_per_token_s: float  # p1
    vision_per_patch_s: float  # v1
    vision_per_call_s: float = 0.0  # c: what a vision call costs whatever its size (weights read, reordered)
    patches_per_call: int = 1024  # the engine's grouping of crops into calls (engine/config.py)
    measured_s: float = 0.0  # how long the calibration itself took

    def vision_s(self, crops: list[int]) -> float:
        """Vision time of one image's crops (patches each), grouped into calls as the engine groups them:
        consecutive crops while they hold at most patches_per_call patches together."""
        calls, held = 0, None
        for n in crops:
            if held is None or held + n > self.patches_per_call:
                calls, held = calls + 1, n
            else:
                held += n
        return self.vision_per_call_s * calls + self.vision_per_patch_s * sum(crops)

    def ttft_s(self, text_tokens: int, plans: list[TilePlan]) -> float:
        """Predicted time to first token of a prompt with `text_tokens` plus these images."""
        tokens = text_tokens + sum(p.image_tokens for p in plans)
        vision = sum(self.vision_s([h * w for h, w in p.spatial_shapes]) for p in plans)
        return self.prefill_fixed_s + self.prefill_per_token_s * tokens + vision


@dataclass(frozen=True)
class BudgetChoice:
    settings: dict[str, Any]  # image options for this request (max_image_tokens, do_image_splitting, ...)
    image_tokens: int
    predicted_ttft_s: float
    latency_target_s: float
    meets_target: bool  # False: even the fastest budget is predicted slower than the target


def check_target(max_image_tokens: Any, latency_target: Any) -> float | None:
    """The latency target in seconds (None without one); "auto" and a target go together. The API, the
    command line and the server all check with this (they name the fields in their own words)."""
    if (max_image_tokens == "auto") != (latency_target is not None):
        raise ValueError("max_image_tokens auto and latency_target SECONDS go together")
    if latency_target is None:
        return None
    number = isinstance(latency_target, (int, float)) and not isinstance(latency_target, bool)
    if not number or not 0 < latency_target < float("inf"):
        raise ValueError(f"latency_target must be a positive number of seconds, got {latency_target!r}")
    return float(latency_target)


def cache_file() -> Path:
    return cache_root() / "calibration.json"


def calibration_sizes(max_len: int) -> tuple[int, int, int]:
    """(small, large) text prompts and the image budget that a calibration within a context of
    `max_len` positions measures: 64, 512 and 256 where they fit, shorter where they do not (the
    text around an image, chat template and markers, stays under 64 tokens)."""
    room = max_len - 1  # prompt positions left beside the one token each run generates
    large = min(512, room)
    small, budget = min(64, large // 4), min(256, room - 64)
    if small < 4 or budget < 4:
        raise ValueError(f"a context of {max_len} positions is too short to calibrate the image budget; set "
                         "max_image_tokens instead of auto")
    return small, large, budget


def calibration_key(model: Any) -> str:
    """What the costs depend on: the weights (path, size, time), device (and which GPU), dtype, quantization,
    threads, CPU, torch, and the prompt sizes measured (a short context measures shorter ones, a cruder fit)."""
    src = Path(str(model.source)) if model.source is not None else None
    files = sorted(src.glob("*.safetensors")) if src is not None and src.is_dir() else []
    weights = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    gpu = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None
    parts = [str(src), weights, str(model.device), gpu, str(model.dtype), model.quantization, torch.get_num_threads(),
             platform.processor() or platform.machine(), cpu_name(), torch.__version__,
             calibration_sizes(model.engine.max_len), "vision per call"]  # the model's layout, too
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _time_first_token(model: Any, request: Any) -> float:
    return model.engine.submit(request).result().ttft_s


def _random_image(side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)  # unique: no image-cache hit


def calibrate(model: Any, repeats: int = 2) -> Calibration:
    """Measure prefill and vision costs on this device (a few seconds for LFM2-VL-450M on 2 cores).

    Every prompt is new (random token ids, random pixels), so neither the prefix nor the image cache
    answers; each point is the fastest of `repeats` runs after one warm-up. The prompts fit the
    engine's context (a checkpoint with a short one calibrates on shorter prompts).
    """
    start = time.perf_counter()
    vocab = model.config.text.vocab_size
    g = torch.Generator().manual_seed(1234)
    seed = iter(range(10**6))
    small, large, budget = calibration_sizes(model.engine.max_len)

    image_token = model.processor.image_token_id

    def text_ttft(n: int) -> float:
        ids = [i if i != image_token else i + 1 for i in torch.randint(100, vocab - 1, (n,), generator=g).tolist()]
        return _time_first_token(model, model.text_request(ids, max_new_tokens=1))

    def image_ttft(side: int, budget: int) -> tuple[float, int, TilePlan]:
        conv = [{"role": "user", "content": [{"type": "image", "image": _random_image(side, next(seed))},
                                             {"type": "text", "text": "Describe."}]}]
        request = model.request(conv, max_new_tokens=1, do_image_splitting=False, max_image_tokens=budget,
                                min_image_tokens=min(16, budget))
        return _time_first_token(model, request), len(request.ids), request.images[0].plan

    text_ttft(small)  # warm-up: lazy initialisation, allocator
    t_small = min(text_ttft(small) for _ in range(repeats))
    t_large = min(text_ttft(large) for _ in range(repeats))
    p1 = max((t_large - t_small) / (large - small), 0.0)
    p0 = max(t_small - p1 * small, 0.0)
    image_ttft(256, budget)  # warm-up of the vision path
    points = []
    for side in (256, 512):
        runs = [image_ttft(side, budget) for _ in range(repeats)]
        t, tokens, plan = min(runs, key=lambda r: r[0])
        patches = plan.spatial_shapes[0][0] * plan.spatial_shapes[0][1]
        points.append((patches, max(t - p0 - p1 * tokens, 0.0)))
    (n1, t1), (n2, t2) = points  # one call each: solve c + v1 n = t through both points
    if n2 == n1:  # a small budget gave both images the same patches: linear through that point
        c, v1 = 0.0, t2 / n2
    else:
        v1 = (t2 - t1) / (n2 - n1)
        c = t1 - v1 * n1
    if c < 0 or v1 <= 0:  # noise: fall back to linear through the larger point
        c, v1 = 0.0, t2 / n2
    return Calibration(p0, p1, v1, c, model.engine.vision_patches, time.perf_counter() - start)


def degenerate(cal: Calibration) -> bool:
    """A calibration that measured no cost per token or per patch (a timer too coarse, a machine busy
    in the wrong moment): every budget would look free, so it is kept for this process only, not cached."""
    return cal.prefill_per_token_s <= 0 or cal.vision_per_patch_s <= 0


_THIS_PROCESS: dict[str, Calibration] = {}  # calibrations not in the cache file (degenerate, or it was unwritable)


def calibration(model: Any, recalibrate: bool = False) -> Calibration:
    """The cached calibration of this model on this device, measured now if missing (or asked)."""
    path, key = cache_file(), calibration_key(model)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not recalibrate and key in _THIS_PROCESS:
        return _THIS_PROCESS[key]
    if not recalibrate and isinstance(stored.get(key), dict):
        try:
            return Calibration(**stored[key])
        except TypeError:
            pass  # an older layout: measure again
    cal = calibrate(model)
    if degenerate(cal):
        warnings.warn(f"the image-budget calibration measured no cost per token or per patch ({cal}); this "
                      "process uses it, but it is not cached: the next process measures again", stacklevel=2)
        _THIS_PROCESS[key] = cal
        return cal
    _THIS_PROCESS.pop(key, None)
    stored[key] = asdict(cal)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)  # atomic: concurrent processes never read half a file
    except OSError as e:  # a read-only home, a full disk: the measurement is still good for this process
        warnings.warn(f"could not cache the image-budget calibration in {path} ({e}); set LFM2VL_CACHE to a "
                      "writable folder to keep it between runs", stacklevel=2)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _THIS_PROCESS[key] = cal
    return cal


def candidates(defaults: Any, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Image settings from the largest budget down; keys the user set (`fixed`) are never changed."""
    out: list[dict[str, Any]] = []
    splitting = fixed.get("do_image_splitting", defaults.do_image_splitting)
    if splitting:
        top = fixed.get("max_tiles", defaults.max_tiles)
        low = fixed.get("min_tiles", defaults.min_tiles)
        for tiles in range(top, low - 1, -1):
            out.append({"do_image_splitting": True, "max_tiles": tiles, "min_tiles": min(low, tiles)})
    if "do_image_splitting" not in fixed or not splitting:
        top, low = defaults.max_image_tokens, fixed.get("min_image_tokens", defaults.min_image_tokens)
        budgets = sorted({*range(top, low - 1, -TOKEN_STEP), low}, reverse=True)
        out += [{"do_image_splitting": False, "max_image_tokens": b, "min_image_tokens": min(b, low)} for b in budgets]
    return [{k: v for k, v in c.items() if k not in fixed} | fixed for c in out]


def choose(processor: Any, cal: Calibration, sizes: list[tuple[int, int]], text_tokens: int,
           latency_target_s: float, fixed: dict[str, Any]) -> BudgetChoice:
    """The largest budget (most image tokens) predicted to meet the target; else the fastest one (the
    smallest among budgets predicted equally fast)."""
    scored, refused = [], None
    for settings in candidates(processor.settings, fixed):
        try:
            plans = [processor.plan(w, h, **settings) for w, h in sizes]
        except ValueError as e:  # e.g. an elongated image that a small budget cannot hold: not a candidate
            refused = refused or e
            continue
        scored.append((sum(p.image_tokens for p in plans), cal.ttft_s(text_tokens, plans), settings))
    if not scored:
        raise refused
    fitting = [s for s in scored if s[1] <= latency_target_s]
    if fitting:
        tokens, predicted, settings = max(fitting, key=lambda s: (s[0], -s[1]))
    else:
        tokens, predicted, settings = min(scored, key=lambda s: (s[1], s[0]))
    return BudgetChoice(settings, tokens, predicted, latency_target_s, bool(fitting))
