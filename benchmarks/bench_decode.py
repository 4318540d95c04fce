"""One decode step of the full-size 450M (a benchmark, not a test): milliseconds per token with
`context` tokens already in the cache, measured in-process without the engine, and the resident
memory after loading.

    python benchmarks/bench_decode.py [--quantize int8|int4] [--dtype bfloat16] [--context 1300]
    LFM2VL_NATIVE_STEP=0 python benchmarks/bench_decode.py --quantize int8   # torch's layers around the kernels

Uses `lfm2vl bench`'s random-weight preset (built once in ~/.cache/lfm2vl/bench). Prints the CPU's
flags, then one JSON line: min and median ms/step of 8 blocks of 10 steps (this machine's noise is
large, so compare the min across runs of one session).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import cpu_flags  # noqa: E402

import lfm2vl  # noqa: E402
from lfm2vl.bench.workload import peak_rss_mb, preset_checkpoint  # noqa: E402


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--context", type=int, default=1300)
    args = ap.parse_args()
    print(f"cpu: {cpu_flags()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    model = lfm2vl.load(preset_checkpoint("450M"), quantize=args.quantize, dtype=args.dtype)
    loaded_mb = rss_mb()
    net = model.module
    cache = net.make_cache(1, 2 * args.context)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        net.forward(torch.randint(0, 60000, (1, args.context)), cache=cache.view([0], args.context), logits_to_keep=1)

        def step() -> None:
            net.forward(token, cache=cache.view([0], 1))[:, -1].float().argmax(-1)

        for _ in range(5):
            step()
        blocks = []
        for _ in range(8):
            start = time.perf_counter()
            for _ in range(10):
                step()
            blocks.append((time.perf_counter() - start) / 10 * 1e3)
    blocks.sort()
    print(json.dumps({"quantize": args.quantize, "dtype": str(model.dtype), "context": args.context,
                      "ms_per_step_min": round(blocks[0], 2), "ms_per_step_median": round(blocks[4], 2),
                      "rss_after_load_mb": round(loaded_mb), "peak_rss_mb": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
