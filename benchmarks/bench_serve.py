"""Serving benchmark (a benchmark, not a timed test): `lfm2vl serve` under concurrent streaming clients.

Starts `lfm2vl serve` with the bundled model in its own process, then talks to it with the official
openai client, streaming:
1. alone: every request sent one at a time (the baseline, and each request's "served alone" answer);
2. concurrent: --clients clients at once, each sending its --per-client requests back to back.
Each request asks about its own random easy-VQA-style image and generates exactly --max-tokens
tokens (ignore_eos, as serving benchmarks do, so both runs do the same work; --natural stops at EOS
instead). The server's image and prefix caches are off (--caches keeps them), so the concurrent run
cannot reuse what the alone run computed. Checks: zero errors, every greedy answer identical to the
same request served alone. Reports p50/p99 time to first token and latency, throughput (completion
tokens/s, requests/s) and the throughput ratio concurrent / alone.

    python benchmarks/bench_serve.py [--clients 32] [--per-client 4] [--max-tokens 32] [--slots 32]

Client and server share this machine's cores. Prints the CPU's flags, a summary, then one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import COLORS, QUESTIONS, SHAPES, cpu_flags, shape_image  # noqa: E402

ROOT = Path(__file__).parent.parent


def start_server(slots: int, caches: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--max-slots", str(slots), "--max-queue", "4096", "--no-access-log"]
    if not caches:
        flags += ["--image-cache-mb", "0", "--prefix-cache-mb", "0"]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server can never block on it
    proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "serve", "--port", str(port), *flags], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read()) from None
            time.sleep(0.1)
    raise RuntimeError("the server did not start within 60 s")


def make_requests(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        shape_image(rng).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        q = rng.choice(QUESTIONS).format(s=rng.choice(SHAPES), c=rng.choice(COLORS))
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": q}]}])
    return out


def one(client: openai.OpenAI, messages: list[dict], args: argparse.Namespace) -> dict:
    """Stream one request: its text, time to first token, latency, completion tokens."""
    start = time.perf_counter()
    ttft, text, usage = None, "", None
    stream = client.chat.completions.create(
        model="lfm2vl", messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": not args.natural})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            ttft = ttft or time.perf_counter() - start
            text += chunk.choices[0].delta.content or ""
    return {"text": text, "ttft": ttft, "latency": time.perf_counter() - start, "tokens": usage.completion_tokens}


def run(base: str, convs: list[list[dict]], clients: int, args: argparse.Namespace) -> tuple[float, list]:
    """Split the requests over `clients` threads (each sends its share back to back); (wall s, results)."""
    results: list = [None] * len(convs)
    errors: list = []

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        for i in range(k, len(convs), clients):
            try:
                results[i] = one(client, convs[i], args)
            except Exception as e:  # noqa: BLE001  (counted and reported, never hidden)
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} errors, first: {errors[0]}")
    return wall, results


def summary(wall: float, results: list[dict]) -> dict:
    ttft = np.array([r["ttft"] for r in results])
    lat = np.array([r["latency"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 2), "completion_tokens": tokens, "tok_s": round(tokens / wall, 1),
            "req_s": round(len(results) / wall, 2),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=32, help="the server's --max-slots")
    ap.add_argument("--natural", action="store_true", help="stop at EOS instead of generating --max-tokens")
    ap.add_argument("--caches", action="store_true", help="keep the server's image and prefix caches on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    print(f"cpu: {cpu_flags()}\ntorch {torch.__version__}, {os.cpu_count()} cores; client and server share them")
    convs = make_requests(args.clients * args.per_client, args.seed)
    proc, base = start_server(args.slots, args.caches)
    try:
        run(base, convs[:4], 4, args)  # warm-up
        alone_wall, alone = run(base, convs, 1, args)
        conc_wall, conc = run(base, convs, args.clients, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    mismatched = [i for i, (a, c) in enumerate(zip(alone, conc, strict=True)) if a["text"] != c["text"]]
    a, c = summary(alone_wall, alone), summary(conc_wall, conc)
    ratio = round(c["tok_s"] / a["tok_s"], 2)
    print(f"{len(convs)} requests, {args.max_tokens} tokens each{'' if args.natural else ' (ignore_eos)'}, "
          f"greedy; server --max-slots {args.slots}, caches {'on' if args.caches else 'off'}")
    for name, s in (("one at a time", a), (f"{args.clients} concurrent clients", c)):
        print(f"  {name:>22}: {s['wall_s']:7.2f} s  {s['tok_s']:7.1f} tok/s  {s['req_s']:6.2f} req/s  "
              f"TTFT p50 {s['ttft_p50_s']:.3f} s p99 {s['ttft_p99_s']:.3f} s  "
              f"latency p50 {s['latency_p50_s']:.3f} s p99 {s['latency_p99_s']:.3f} s")
    print(f"  throughput ratio: {ratio}x; errors: 0; answers identical to served alone: "
          f"{len(convs) - len(mismatched)}/{len(convs)}")
    print(json.dumps({"requests": len(convs), "clients": args.clients, "max_tokens": args.max_tokens,
                      "ignore_eos": not args.natural, "slots": args.slots, "caches": args.caches, "errors": 0,
                      "identical_to_alone": len(convs) - len(mismatched), "alone": a, "concurrent": c,
                      "throughput_ratio": ratio}))
    if mismatched:
        raise SystemExit(f"answers differ from served-alone for requests {mismatched[:10]}")


if __name__ == "__main__":
    main()
