/* lfm2vl's own CPU kernels for decode rows (lfm2vl/native/__init__.py builds this file with the
 * system C compiler, -O3 -march=native, and loads it with ctypes; without a compiler, or on a CPU
 * without AVX512-VNNI, the quantized layers keep torch's kernels).
 *
 * A decode step multiplies one row per sequence by every weight once, so its speed is the speed at
 * which a kernel streams the weights. On a 2-core AVX-512 EPYC torch's int8 weight-only GEMV streams
 * 12-17 G weights/s and its int4 kernel 32-35; int8_rows about 32 (the memory's own rate there: a byte
 * a weight) and int4_rows 55-67 (docs/performance.md).
 *
 * Both round the activations to int8 per group of 32 inputs (one float32 scale each, max|x| / 127,
 * as llama.cpp's Q8_0 does), so that the products sum exactly in int32 with VNNI (vpdpbusd: four
 * u8 x s8 products a lane), and scale each group's sum in float32. A group of 32 keeps an outlier
 * from coarsening a whole row's grid: on the bundled model, int8 decode steps agree with fp32 as the
 * weight-only GEMV does (one scale a row cost 2 points; docs/performance.md). Each output is one
 * row's products with one weight row, whatever the rows beside it and the thread count.
 *
 * Threads: OpenMP, in the process's one OpenMP runtime (torch's), as many as torch uses (an argument).
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>

int kernels_available(void) { return 1; }

/* x (m, k) float32 -> xq (m, k) int8, xs (m, k / 32) scales, xsum (m, k / 32) scale * sum of the group's xq */
static void quantize_groups(const float *x, int64_t m, int64_t k, int8_t *xq, float *xs, float *xsum) {
    const int64_t groups = k / 32;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const float *v = x + r * k + g * 32;
            int8_t *q = xq + r * k + g * 32;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
            float s = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) {
                q[i] = (int8_t)nearbyintf(v[i] / s);
                sum += q[i];
            }
            xs[r * groups + g] = s;
            if (xsum) xsum[r * groups + g] = s * (float)sum;
        }
    }
}

/* ---- int8 decode rows: w (n, k) int8, one float32 scale a row (lfm2vl/quant) ----
 * x (m, k) float32 -> y (m, n) float32 = w_scale * sum_g xs_g * sum_{k in g} xq_k w_k. vpdpbusd takes
 * u8 x s8: |w| times x with w's sign. xq, xs (m, k / 32) and xs16 (m, k / 2): the caller's scratch. */
void int8_rows(const float *x, const int8_t *w, const float *w_scale, float *y, int64_t m, int64_t n, int64_t k,
               int8_t *xq, float *xs, float *xs16, int threads) {
    const int64_t groups = k / 32;
    quantize_groups(x, m, k, xq, xs, NULL);
    for (int64_t r = 0; r < m; r++) /* each group's scale 8 times: the lanes its products land in */
        for (int64_t g = 0; g < groups; g++)
            for (int i = 0; i < 8; i++) xs16[r * groups * 8 + g * 8 + i] = xs[r * groups + g];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *wr = w + j * k;
        for (int64_t r = 0; r < m; r++) {
            const int8_t *a = xq + r * k;
            const float *sc = xs16 + r * groups * 8;
            __m512 acc = _mm512_setzero_ps();
            int64_t kk = 0;
            for (; kk + 64 <= k; kk += 64) {
                __m512i wv = _mm512_loadu_si512((const void *)(wr + kk));
                __m512i av = _mm512_loadu_si512((const void *)(a + kk));
                __mmask64 negative = _mm512_movepi8_mask(wv);
                __m512i signed_a = _mm512_mask_sub_epi8(av, negative, _mm512_setzero_si512(), av);
                __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), signed_a);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(sc + kk / 4), acc);
            }
            float total = _mm512_reduce_add_ps(acc);
            if (kk < k) { /* a last group of 32 */
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + kk));
                __m256i av = _mm256_loadu_si256((const __m256i *)(a + kk));
                __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(av, wv));
                __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(sc + kk / 4));
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(part), _mm256_extractf128_ps(part, 1));
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                h = _mm_add_ss(h, _mm_movehdup_ps(h));
                total += _mm_cvtss_f32(h);
            }
            y[r * n + j] = total * w_scale[j];
        }
    }
}

/* ---- int4 decode rows, on torch's AVX-512 CPU int4 packing (lfm2vl/quant/int4.py) ----
 *
 * The weight (n, k) is packed 64 output rows to a block: block b is (k, 32) bytes, byte [kk, j]
 * holding row 64b + j in its low nibble and row 64b + 32 + j in its high one (q in 0..15); the
 * scales (k / 32, n, 2) bf16 hold (scale, zero) per group of 32 inputs: w = (q - 8) * scale + zero.
 * With the activations rounded per group of 32 (above), one output row a lane:
 *   y = sum_g xs_g * (scale_g * sum_k xq_k q_k + (zero_g - 8 scale_g) * sum_k xq_k).
 * Four rows of 32 bytes (4 inputs x 64 outputs) are interleaved into lanes of 4 bytes by two rounds
 * of byte and word unpacking, which permutes the rows within the block; the scales are read and the
 * outputs written in the same order. */

/* The rows of the block that lane group u (0..3) of the unpacked vectors holds: 4u..4u+3 in lanes
 * 0-3, 16+4u..16+4u+3 in lanes 4-7 (+32 for the high nibbles). */
static inline __m256 load_pairs(const uint32_t *sz, int64_t row) {
    __m128i lo = _mm_loadu_si128((const __m128i *)(sz + row));
    __m128i hi = _mm_loadu_si128((const __m128i *)(sz + row + 16));
    return _mm256_castsi256_ps(_mm256_set_m128i(hi, lo));
}

static inline void store_rows(float *y, int64_t row, __m256 v) {
    _mm_storeu_ps(y + row, _mm256_castps256_ps128(v));
    _mm_storeu_ps(y + row + 16, _mm256_extractf128_ps(v, 1));
}

/* x (m, k) float32 -> y (m, n) float32; xq (m, k) int8, xs and xsum (m, k / 32) float32: scratch. */
void int4_rows(const float *x, const uint8_t *w, const uint16_t *scales_zeros, float *y, int64_t m, int64_t n,
               int64_t k, int8_t *xq, float *xs, float *xsum, int threads) {
    const int64_t groups = k / 32, blocks = n / 64;
    quantize_groups(x, m, k, xq, xs, xsum);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i high16 = _mm256_set1_epi32((int)0xffff0000u);
    const __m256 eight = _mm256_set1_ps(8.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = w + b * k * 32;
        for (int64_t r = 0; r < m; r++) {
            const int8_t *a = xq + r * k;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                __m256i sums[8];
                for (int i = 0; i < 8; i++) sums[i] = _mm256_setzero_si256();
                for (int64_t kk = g * 32; kk < g * 32 + 32; kk += 4) {
                    const uint8_t *p = blk + kk * 32;
                    __m256i a0 = _mm256_loadu_si256((const __m256i *)p);
                    __m256i a1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                    __m256i a2 = _mm256_loadu_si256((const __m256i *)(p + 64));
                    __m256i a3 = _mm256_loadu_si256((const __m256i *)(p + 96));
                    __m256i t0 = _mm256_unpacklo_epi8(a0, a1), t1 = _mm256_unpackhi_epi8(a0, a1);
                    __m256i t2 = _mm256_unpacklo_epi8(a2, a3), t3 = _mm256_unpackhi_epi8(a2, a3);
                    __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                                    _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
                    int32_t x4;
                    memcpy(&x4, a + kk, 4);
                    __m256i xb = _mm256_set1_epi32(x4);
                    for (int i = 0; i < 4; i++) {
                        sums[i] = _mm256_dpbusd_epi32(sums[i], _mm256_and_si256(u[i], low4), xb);
                        sums[4 + i] = _mm256_dpbusd_epi32(sums[4 + i], _mm256_and_si256(_mm256_srli_epi16(u[i], 4), low4), xb);
                    }
                }
                const uint32_t *sz = (const uint32_t *)scales_zeros + g * n + b * 64;
                __m256 d = _mm256_set1_ps(xs[r * groups + g]), dz = _mm256_set1_ps(xsum[r * groups + g]);
                for (int i = 0; i < 8; i++) {
                    __m256 pairs = load_pairs(sz, (i & 3) * 4 + (i >> 2) * 32);
                    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(pairs), 16));
                    __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(pairs), high16));
                    __m256 zz = _mm256_fnmadd_ps(eight, scale, zero);
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i]), _mm256_mul_ps(scale, d), acc[i]);
                    acc[i] = _mm256_fmadd_ps(zz, dz, acc[i]);
                }
            }
            for (int i = 0; i < 8; i++) store_rows(y + r * n + b * 64, (i & 3) * 4 + (i >> 2) * 32, acc[i]);
        }
    }
}
#else
int kernels_available(void) { return 0; } /* the kernels are written for AVX512-VNNI */
#endif
