"""Engine benchmark (a benchmark, not a timed test): continuous batching and the caches.

1. Throughput: N requests on the bundled model, each about its own random easy-VQA-style image,
   arriving at random (Poisson) times; continuous batching (8 slots) against one request at a time
   (1 slot), same arrivals, same greedy tokens (checked). Each request generates exactly
   --new-tokens tokens (ignore_eos), as serving benchmarks do, so both sides do the same work.
2. Caches: on a full-size random LFM2-VL-450M (speed does not depend on weight values), the second
   turn of an image chat (1024x1024 image, default image settings): time to first token with the
   image and prefix caches against a cold engine without them.

    python benchmarks/bench_engine.py [--requests 64] [--new-tokens 32] [--skip-450m]

Prints the CPU's flags and torch's thread count, a summary per part, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import lfm2vl
from lfm2vl.cpu import cpu_name, vector_flags
from lfm2vl.engine import Engine, EngineConfig

SHAPES, COLORS = ("circle", "rectangle", "triangle"), ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
QUESTIONS = ("what shape is in the image?", "what color is the shape?", "is there a {s}?", "is the shape {c}?")


def cpu_flags() -> str:
    return f"{cpu_name() or platform.processor() or platform.machine()}; {' '.join(vector_flags())}"


def shape_image(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    d, c, s = ImageDraw.Draw(img), rng.choice(COLORS), rng.choice(SHAPES)
    x, y, r = rng.randint(18, 46), rng.randint(18, 46), rng.randint(8, 16)
    box = (x - r, y - r, x + r, y + r)
    {"circle": d.ellipse, "rectangle": d.rectangle}.get(s, lambda b, fill: d.polygon(
        [(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill))(box, fill=c)
    return img


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]}


def run_arrivals(model, requests, arrivals, slots: int) -> tuple[float, list[list[int]], float]:
    """Submit each request at its arrival time (seconds from start); step until all finish."""
    engine = Engine(model.module, model.processor.decode,
                    EngineConfig(max_slots=slots, prefix_cache_mb=0, image_cache_mb=0))
    handles, ttfts = [None] * len(requests), []
    start, nxt = time.perf_counter(), 0
    while nxt < len(requests) or any(not h.done for h in handles if h is not None):
        now = time.perf_counter() - start
        while nxt < len(requests) and arrivals[nxt] <= now:
            handles[nxt] = engine.submit(requests[nxt])
            nxt += 1
        if not engine.step() and nxt < len(requests):
            time.sleep(max(0.0, min(0.002, arrivals[nxt] - now)))
    total = time.perf_counter() - start
    ttfts = [h.completion.ttft_s for h in handles]
    return total, [h.completion.token_ids for h in handles], float(np.median(ttfts))


def part_throughput(n: int, new_tokens: int, rate: float, seed: int) -> dict:
    model = lfm2vl.load()
    rng = random.Random(seed)
    opts = dict(max_new_tokens=new_tokens, ignore_eos=True)
    convs = []
    for _ in range(n):
        q = rng.choice(QUESTIONS).format(s=rng.choice(SHAPES), c=rng.choice(COLORS))
        convs.append([user(q, shape_image(rng))])
    requests = [model.request(c, **opts) for c in convs]
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    run_arrivals(model, requests[:4], arrivals[:4], 8)  # warm-up
    cb_s, cb_tokens, cb_ttft = run_arrivals(model, requests, arrivals, 8)
    seq_s, seq_tokens, seq_ttft = run_arrivals(model, requests, arrivals, 1)
    assert cb_tokens == seq_tokens, "continuous batching changed some request's greedy tokens"
    tokens = n * new_tokens
    return {
        "requests": n, "new_tokens": new_tokens, "arrival_rate_per_s": rate, "arrivals_span_s": round(arrivals[-1], 2),
        "batched_s": round(cb_s, 2), "one_at_a_time_s": round(seq_s, 2),
        "batched_tok_s": round(tokens / cb_s, 1), "one_at_a_time_tok_s": round(tokens / seq_s, 1),
        "throughput_ratio": round(seq_s / cb_s, 2),
        "median_ttft_batched_s": round(cb_ttft, 3), "median_ttft_one_at_a_time_s": round(seq_ttft, 3),
    }


def part_caches(new_tokens: int) -> dict:
    from lfm2vl.bench.workload import preset_checkpoint

    model = lfm2vl.load(preset_checkpoint("450M"))  # full size, random weights, LFM2-VL's image defaults
    module, processor = model.module, model.processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    opts = dict(max_new_tokens=new_tokens, ignore_eos=True)
    conv = [user("Describe this image in detail.", image)]

    def ttft(engine, c):
        h = engine.submit(model.request(c, **opts))
        comp = h.result()
        return comp

    warm_engine = Engine(module, processor.decode, EngineConfig())
    first = ttft(warm_engine, conv)
    turn2 = conv + [{"role": "assistant", "content": first.text}, user("What colours are there?")]
    warm = ttft(warm_engine, turn2)
    cold_engine = Engine(module, processor.decode, EngineConfig(prefix_cache_mb=0, image_cache_mb=0))
    cold = ttft(cold_engine, turn2)
    assert warm.token_ids == cold.token_ids, "prefix reuse changed the greedy tokens"
    return {
        "model": "LFM2-VL-450M (random weights, fp32)", "turn1_prompt_tokens": first.prompt_tokens,
        "turn1_ttft_s": round(first.ttft_s, 3), "turn2_prompt_tokens": warm.prompt_tokens,
        "turn2_cached_tokens": warm.cached_tokens, "turn2_ttft_cached_s": round(warm.ttft_s, 3),
        "turn2_ttft_cold_s": round(cold.ttft_s, 3), "ttft_ratio": round(cold.ttft_s / warm.ttft_s, 1),
        "decode_tok_s": round(first.generation_tps, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rate", type=float, default=400.0, help="mean arrivals per second (Poisson; high enough to load the engine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-450m", action="store_true")
    args = ap.parse_args()
    print(f"cpu: {cpu_flags()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    out = {"throughput": part_throughput(args.requests, args.new_tokens, args.rate, args.seed)}
    t = out["throughput"]
    print(f"[1] {t['requests']} requests x {t['new_tokens']} tokens, bundled model: batched {t['batched_s']} s "
          f"({t['batched_tok_s']} tok/s) vs one at a time {t['one_at_a_time_s']} s ({t['one_at_a_time_tok_s']} tok/s): "
          f"{t['throughput_ratio']}x")
    if not args.skip_450m:
        out["caches"] = c = part_caches(args.new_tokens)
        print(f"[2] 450M image chat, turn 2 ({c['turn2_prompt_tokens']} tokens, {c['turn2_cached_tokens']} cached): "
              f"TTFT {c['turn2_ttft_cached_s']} s with caches vs {c['turn2_ttft_cold_s']} s cold: {c['ttft_ratio']}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
