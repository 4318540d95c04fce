/* lfm2vl's own CPU kernels for decode rows (lfm2vl/native/__init__.py builds this file with the
 * system C compiler, -O3 -march=native, and loads it with ctypes; without a compiler the quantized
 * layers keep torch's kernels).
 *
 * A decode step multiplies one row per sequence by every weight once, so its speed is the speed at
 * which a kernel streams the weights. torch's int8 weight-only GEMV streams 12-17 G weights/s on a
 * 2-core AVX-512 EPYC; this loop, which the compiler vectorizes (VNNI / AVX2 dot products), about 32,
 * the memory's own rate there (docs/performance.md).
 *
 * int8_rows_* compute exactly what lfm2vl/quant's int8_dynamic_linear computes for the same rows,
 * bit for bit: each row quantized to int8 with a scale of its own, max|x| / 127, the products summed
 * exactly in int32, then rounded and scaled in the same order and the same precision as its torch
 * operations (tests/test_native.py compares the two bits). Each output is one row's dot product with
 * one weight row, whatever the number of rows beside it.
 *
 * Threads: OpenMP, in the process's one OpenMP runtime (torch's), as many as torch uses (an argument).
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, as torch's float -> bfloat16 conversion (c10::BFloat16) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (isnan(f)) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* One row x (k floats) -> xq (k int8) and its scale: max(amax, -amin) clamped to 1e-12, / 127 (float32). */
static float quantize_row(const float *x, int8_t *xq, int64_t k) {
    float hi = -INFINITY, lo = INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < k; i++) {
        hi = x[i] > hi ? x[i] : hi;
        lo = x[i] < lo ? x[i] : lo;
        nan |= x[i] != x[i];
    }
    if (nan) { /* torch's amax gives NaN, and so every product of the row */
        memset(xq, 0, (size_t)k);
        return NAN;
    }
    float amax = hi > -lo ? hi : -lo;
    float scale = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    for (int64_t i = 0; i < k; i++) xq[i] = (int8_t)nearbyintf(x[i] / scale);
    return scale;
}

static inline int32_t dot_i8(const int8_t *a, const int8_t *b, int64_t k) {
    int32_t acc = 0;
    for (int64_t i = 0; i < k; i++) acc += (int32_t)a[i] * (int32_t)b[i];
    return acc;
}

/* x (m, k) float32, w (n, k) int8, w_scale (n,) float32 -> y (m, n) float32:
 * y = float(sum) * row_scale * w_scale. xq (m, k) and row_scale (m,) are the caller's scratch. */
void int8_rows_f32(const float *x, const int8_t *w, const float *w_scale, float *y, int64_t m, int64_t n,
                   int64_t k, int8_t *xq, float *row_scale, int threads) {
    for (int64_t r = 0; r < m; r++) row_scale[r] = quantize_row(x + r * k, xq + r * k, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        for (int64_t r = 0; r < m; r++) {
            float sum = (float)dot_i8(xq + r * k, w + j * k, k);
            y[r * n + j] = sum * row_scale[r] * w_scale[j];
        }
    }
}

/* The same in bfloat16 (x, w_scale, y as uint16 bits; xf (m, k) float32 scratch): the int32 sum is
 * rounded to bf16, times the row scale rounded to bf16, rounded, times w_scale, rounded: torch's
 * y.copy_(sums); y.mul_(row_scale.to(bf16)); y.mul_(w_scale) in bf16. */
void int8_rows_bf16(const uint16_t *x, const int8_t *w, const uint16_t *w_scale, uint16_t *y, int64_t m,
                    int64_t n, int64_t k, int8_t *xq, float *row_scale, float *xf, int threads) {
    for (int64_t r = 0; r < m; r++) {
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * k + i]);
        row_scale[r] = round_bf16(quantize_row(xf + r * k, xq + r * k, k));
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float ws = bf16_to_f32(w_scale[j]);
        for (int64_t r = 0; r < m; r++) {
            float sum = round_bf16((float)dot_i8(xq + r * k, w + j * k, k));
            y[r * n + j] = f32_to_bf16(round_bf16(sum * row_scale[r]) * ws);
        }
    }
}
