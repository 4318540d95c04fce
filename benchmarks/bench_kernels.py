"""Linear-layer kernels on this machine (a benchmark, not a test): what lfm2vl/quant/ chooses from.

One LFM2-VL-450M feed-forward projection (1024 -> 6656) at several row counts, with the weight in
fp32 (torch's F.linear, MKL, and oneDNN's float32 matmul, which lfm2vl/model/linear.py uses), bf16,
int8 (torch's int8 weight-only GEMV `_weight_int8pack_mm`, widen-to-bf16-and-multiply a block of
rows at a time, torch's dynamic int8 `quantize_dynamic` with one activation scale per tensor, and
lfm2vl's int8 x int8 with one scale per row, `int8_dynamic_linear`, and on float32 rows its AVX2 GEMM,
lfm2vl/native/gemm.c) and int4 (lfm2vl's Int4Linear:
torch's int4 kernel, unpack-to-bf16 or float32-and-multiply by blocks, and lfm2vl's int4 kernel on
float32 rows, the prompt rows' path on AVX2 CPUs without VNNI), in milliseconds with the weight hot
in cache; then the rate at which decode can stream weights from memory (50 different weights,
cold; int8, int4 weight-only, bf16 and fp32, and lfm2vl's own int8 and int4 decode kernels where
they are built): the bound on decode speed, since every token reads every weight once. Last, one decode
step of attention (one query, 16 heads over 8 KV heads, 1,400 keys) in bf16: SDPA against
lfm2vl's `one_query_attention`, and one conv-layer tap: conv1d against the dot product.

    python benchmarks/bench_kernels.py

Prints the CPU's flags, a table, then one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import cpu_flags  # noqa: E402

from lfm2vl import native  # noqa: E402
from lfm2vl.model.linear import linear as onednn_linear  # noqa: E402
from lfm2vl.quant import INT4_GROUP, Int4Linear, int4_block, int8_dynamic_linear, widened_linear  # noqa: E402

K, N = 1024, 6656


def timed(fn, reps: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def hot() -> dict[int, dict[str, float]]:
    warnings.filterwarnings("ignore")
    from torch.ao.quantization import quantize_dynamic

    linear = torch.nn.Linear(K, N, bias=False)
    dynamic = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
    w = linear.weight.detach()
    scale = w.abs().amax(1) / 127
    w8, sb, wb = torch.round(w / scale[:, None]).to(torch.int8), scale.bfloat16(), w.bfloat16()
    q4 = Int4Linear.from_weight(w, None, torch.bfloat16)
    out = {}
    with torch.inference_mode():
        for rows in (1, 8, 64, 1024):
            x = torch.randn(rows, K)
            xb = x.bfloat16()
            reps = 100 if rows < 100 else 10
            out[rows] = {
                "fp32": timed(lambda: F.linear(x, w), reps),
                "fp32_onednn": timed(lambda: onednn_linear(x, w), reps),
                "bf16": timed(lambda: F.linear(xb, wb), reps),
                "int8_gemv": timed(lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, sb), reps),
                "int8_widen_bf16": timed(lambda: widened_linear(xb, N, lambda i, j: w8[i:j].to(torch.bfloat16).mul_(sb[i:j, None])), reps),
                "int8_dynamic": timed(lambda: dynamic(x), reps),
                "int8_x_int8_row": timed(lambda: int8_dynamic_linear(xb, w8, sb), reps),
                # lfm2vl/native/gemm.c, the prompt rows' path on AVX2 CPUs without VNNI (float32 rows)
                **({"int8_gemm_avx2": timed(lambda: native.int8_gemm(x, w8, scale), reps)} if native.library() else {}),
                "int4_kernel": timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, q4.qweight, INT4_GROUP, q4.scales_zeros), reps),
                "int4_unpack_bf16": timed(lambda: widened_linear(xb, N, lambda i, j: q4.dequantized(torch.bfloat16, i, j)), reps),
                "int4_unpack_fp32": timed(lambda: widened_linear(x, N, lambda i, j: q4.dequantized(torch.float32, i, j)), reps),
                # lfm2vl's int4 kernel on float32 rows: decode rows, and prompt rows where int4_prompt_kernel()
                **({"int4_native": timed(lambda: native.int4_rows(x, q4.qweight, q4.scales_zeros, N, int4_block()), reps)}
                   if native.library() else {}),
            }
    return out


def native_rates(x, w8, s8, w4, sz, layers: int) -> list:
    """lfm2vl's own decode kernels (lfm2vl/native) on the same weights, where they are built here."""
    if native.library() is None:
        print(f"lfm2vl native kernels: not built ({native.why_not()})")
        return []
    block = int4_block()
    return [(f"lfm2vl_int8_{native.isa()}", lambda: [native.int8_rows(x, w, s) for w, s in zip(w8, s8)], layers),
            (f"lfm2vl_int4_{native.isa()}", lambda: [native.int4_rows(x, w, sz, N, block) for w in w4], layers)]


def cold(layers: int = 50) -> dict[str, float]:
    """G weights/s streaming `layers` different weights once each (nothing stays in cache)."""
    x = torch.randn(1, K).bfloat16()
    w8 = [torch.randint(-127, 127, (N, K), dtype=torch.int8) for _ in range(layers)]
    s8 = [torch.rand(N).bfloat16() for _ in range(layers)]
    wb = [torch.randn(N, K).bfloat16() for _ in range(layers // 2)]
    wf = [torch.randn(N, K) for _ in range(layers // 4)]
    group = 32  # int4 weight-only: packed by torch, one (scale, zero) pair per 32 weights
    w4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
          for _ in range(layers)]
    sz = torch.rand(K // group, N, 2).bfloat16()
    rates = {}
    with torch.inference_mode():
        for name, run, count in (
            ("int8_gemv", lambda: [torch.ops.aten._weight_int8pack_mm(x, w, s) for w, s in zip(w8, s8)], layers),
            ("int4_gemv", lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz) for w in w4], layers),
            ("bf16", lambda: [F.linear(x, w) for w in wb], layers // 2),
            ("fp32", lambda: [F.linear(x.float(), w) for w in wf], layers // 4),
            ("fp32_onednn", lambda: [onednn_linear(x.float(), w) for w in wf], layers // 4),
            *native_rates(x, w8, s8, w4, sz, layers),
        ):
            best = min(timed(run, 1) for _ in range(3)) / 1e3
            rates[name] = count * N * K / best / 1e9
    return rates


def decode_ops() -> dict[str, float]:
    """Microseconds of one decode step's attention (bf16) and conv tap, each way."""
    from lfm2vl.model.text import one_query_attention

    q, k, v = (torch.randn(1, h, n, 64).bfloat16() for h, n in ((16, 1), (8, 1400), (8, 1400)))
    kt = torch.randn(1, 8, 64, 2048).bfloat16()[..., :1400]  # the cache's K^T view: 1,400 of 2,048 positions
    full, w = torch.randn(1, 1024, 3).bfloat16(), torch.randn(1024, 1, 3).bfloat16()
    with torch.inference_mode():
        return {name: timed(fn, 200) * 1e3 for name, fn in (
            ("attention_sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
            ("attention_one_query", lambda: one_query_attention(q, kt, v, None)),
            ("conv_conv1d", lambda: F.conv1d(full, w, None, groups=1024)),
            ("conv_dot", lambda: (full * w[:, 0]).sum(-1, keepdim=True)),
        )}


def main() -> None:
    print(f"cpu: {cpu_flags()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    h, c, d = hot(), cold(), decode_ops()
    print(f"{K} -> {N}, ms (weight hot in cache):")
    print(f"{'rows':>6}" + "".join(f"{k:>17}" for k in h[1]))
    for rows, r in h.items():
        print(f"{rows:>6}" + "".join(f"{v:>17.3f}" for v in r.values()))
    print("streaming from memory (cold): " + ", ".join(f"{k} {v:.1f} G weights/s" for k, v in c.items()))
    print("decode step, us: " + ", ".join(f"{k} {v:.1f}" for k, v in d.items()))
    print(json.dumps({"hot_ms": h, "cold_g_weights_per_s": c, "decode_us": d}))


if __name__ == "__main__":
    main()
