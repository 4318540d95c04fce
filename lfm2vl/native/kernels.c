/* lfm2vl's own CPU kernels for decode rows, and for int4 prompt rows on CPUs without int8 products in
 * torch (lfm2vl/quant/int4.py: int4_prompt_kernel; lfm2vl/native/__init__.py builds this file with the
 * system C compiler, -O3 -march=native, and loads it with ctypes; without a compiler, or on a CPU
 * with neither AVX2 + FMA nor AVX512-VNNI, the quantized layers keep torch's kernels).
 *
 * A decode step multiplies one row per sequence by every weight once, so its speed is the speed at
 * which a kernel streams the weights. On a 2-core AVX-512 EPYC torch's int8 weight-only GEMV streams
 * 12-17 G weights/s and its int4 kernel 32-35; int8_rows about 32 (the memory's own rate there: a byte
 * a weight) and int4_rows 55-67. On a 2-core AVX2 EPYC torch's int8 GEMV streams about 6 G weights/s
 * and the AVX2 kernels here several times that (docs/performance.md).
 *
 * Both round the activations to int8 per group of 32 inputs (one float32 scale each, max|x| / 127,
 * as llama.cpp's Q8_0 does), so that the products sum exactly in int32 (VNNI's vpdpbusd: four u8 x
 * s8 products a lane; AVX2's vpmaddubsw, two a 16-bit lane, whose largest sums, 2 x 128 x 127 for
 * int8 and 8 x 2 x 15 x 127 for int4, stay below 2^15), and scale each group's sum in float32. A
 * group of 32 keeps an outlier from coarsening a whole row's grid: on the bundled model, int8 decode
 * steps agree with fp32 as the weight-only GEMV does (one scale a row cost 2 points;
 * docs/performance.md). Each output is one row's products with one weight row, whatever the rows
 * beside it and the thread count; the int4 kernels give the same bits with AVX2 as with VNNI.
 *
 * Threads: OpenMP, in the process's one OpenMP runtime (torch's), as many as torch uses (an argument).
 * Scratch: malloc'd a call (under 150 KB for SMALL_ROWS rows of 8,192 inputs; int4 prompt rows
 * write 1.25 bytes an input, 2.9 MB for 512 rows of 4,608).
 */

#include "kernels.h"

/* 2: AVX512-VNNI (and AVX2) kernels; 1: AVX2 ones; 0: none (lfm2vl/native/__init__.py: ISAS). */
int kernels_isa(void) {
#if defined(HAVE_VNNI) && defined(HAVE_AVX2)
    return 2;
#elif defined(HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef HAVE_AVX2

/* x (m, k) float32, or bfloat16 where x_bf16 (widened exactly) -> xq (m, k) int8 rounded to nearest
 * even, xs (m, k / 32) scales max|x| / 127, xsum (m, k / 32) scale * the sum of the group's xq (if
 * not NULL). The same bits as the scalar `round(x / s)` (tests/test_native.py: _group_rounded). */
HIDDEN void quantize_groups(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *xs, float *xsum) {
    const int64_t groups = k / 32;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    /* prompt rows (hundreds) on torch's threads; a decode step's few rows on one (no fork to pay) */
#pragma omp parallel for if (m >= 64) schedule(static)
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = r * k + g * 32;
            __m256 v[4];
            for (int i = 0; i < 4; i++) {
                if (x_bf16) {
                    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + at + 8 * i));
                    v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                } else {
                    v[i] = _mm256_loadu_ps((const float *)x + at + 8 * i);
                }
            }
            __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                                        _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
            float top = hmax8(amax);
            float s = (top > 1e-30f ? top : 1e-30f) / 127.0f;
            if (any_nan8(v[0]) || any_nan8(v[1]) || any_nan8(v[2]) || any_nan8(v[3])) s = NAN;
            __m256i q[4];
            round32(v, _mm256_set1_ps(s), xq + at, q);
            xs[r * groups + g] = s;
            if (xsum)
                xsum[r * groups + g] = s * (float)hsum8i(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        }
    }
}

/* ---- int8 decode rows: w (n, k) int8, one float32 scale a row (lfm2vl/quant) ----
 * AVX2: one group of 32 a vector; |w| (u8) x (xq with w's sign) by vpmaddubsw, pairs to int32 by
 * vpmaddwd, then that group's scale (xs16: 8 copies) in float32, two accumulators. */
/* How far ahead of its reads a decode kernel asks for weights: the hardware's own prefetching leaves
 * the AVX2 kernels 10-20% slower on a 2-core AVX2 EPYC. */
#define PREFETCH_BYTES 1024

/* the 8 int32 sums of group g's 32 products of weight row w and activations a, as float32 */
static inline __m256 group_sums(const int8_t *w, const int8_t *a, int64_t g, __m256i ones) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + g * 32));
    __m256i av = _mm256_loadu_si256((const __m256i *)(a + g * 32));
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(av, wv));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
}

HIDDEN void int8_rows_avx2(const int8_t *xq, const float *xs16, const int8_t *w, const float *w_scale, float *y,
                           int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t groups = k / 32;
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *wr = w + j * k;
        for (int64_t r = 0; r < m; r++) {
            const int8_t *a = xq + r * k;
            const float *sc = xs16 + r * groups * 8;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 2 <= groups; g += 2) {
                _mm_prefetch((const char *)(wr + g * 32 + PREFETCH_BYTES), _MM_HINT_T0);
                acc0 = _mm256_fmadd_ps(group_sums(wr, a, g, ones), _mm256_loadu_ps(sc + g * 8), acc0);
                acc1 = _mm256_fmadd_ps(group_sums(wr, a, g + 1, ones), _mm256_loadu_ps(sc + g * 8 + 8), acc1);
            }
            if (g < groups) acc0 = _mm256_fmadd_ps(group_sums(wr, a, g, ones), _mm256_loadu_ps(sc + g * 8), acc0);
            y[r * n + j] = hsum8(_mm256_add_ps(acc0, acc1)) * w_scale[j];
        }
    }
}

/* acc + sums * scale * xs_g + (zero - 8 scale) * xsum_g, for 8 output rows whose (scale, zero) bf16
 * pairs are `pairs`: the int4 kernels' float32 steps, the same in both. */
static inline __m256 add_scaled_sums(__m256 acc, __m256i sums, __m256 pairs, __m256 d, __m256 dz) {
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(pairs), 16));
    __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(pairs), _mm256_set1_epi32((int)0xffff0000u)));
    __m256 zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, zero);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(scale, d), acc);
    return _mm256_fmadd_ps(zz, dz, acc);
}

/* ---- int4 decode rows, AVX2, on either of torch's CPU int4 packings (lfm2vl/quant/int4.py) ----
 *
 * A block of `block` (32 or 64) output rows is (k, block / 2) bytes, byte [kk, j] holding row j in
 * its low nibble and row block / 2 + j in its high one; scales as for the VNNI kernel below. Each 16
 * bytes of a block's input row are taken apart (16 rows low, 16 high): rows kk, kk + 1 side by side
 * in one vector and kk + 2, kk + 3 in another, byte unpacking pairs kk with kk + 2 (and kk + 1 with
 * kk + 3) for one row a 16-bit lane, and vpmaddubsw multiplies each pair by the matching pair of
 * activations. Eight such steps (a group of 32 inputs) sum in 16 bits, then the two halves of each
 * vector add up in 32. */
/* Rows r .. r + R - 1 (R = 1 or 2) of y against the 32 outputs of one task (`rows`: the first of
 * the 8 each accumulator holds); the weights are taken apart once a step for both rows, whose own
 * steps are those of one row alone (the same bits however the rows are tiled). */
static inline __attribute__((always_inline)) void int4_tile(
    const int8_t *xq, const float *xs, const float *xsum, const uint8_t *blk, const float *scales_zeros, float *y,
    int64_t r, int R, int64_t n, int64_t k, int64_t stride, const int64_t rows[4], __m256i low4, __m256i pairing) {
    const int64_t groups = k / 32;
    __m256 acc[2][4];
    for (int q = 0; q < R; q++)
        for (int i = 0; i < 4; i++) acc[q][i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i s16[2][4];
        for (int q = 0; q < R; q++)
            for (int i = 0; i < 4; i++) s16[q][i] = _mm256_setzero_si256();
        for (int64_t kk = g * 32; kk < g * 32 + 32; kk += 4) {
            const uint8_t *p = blk + kk * stride;
            _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
            __m256i lo, hi;
            if (stride == 16) { /* rows kk and kk + 1 lie side by side */
                lo = _mm256_loadu_si256((const __m256i *)p);
                hi = _mm256_loadu_si256((const __m256i *)(p + 32));
            } else {
                lo = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + stride)), _mm_loadu_si128((const __m128i *)p));
                hi = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + 3 * stride)),
                                      _mm_loadu_si128((const __m128i *)(p + 2 * stride)));
            }
            const __m256i lo4 = _mm256_and_si256(lo, low4), hi4 = _mm256_and_si256(hi, low4);
            const __m256i lo_high = _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4);
            const __m256i hi_high = _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4);
            const __m256i u[4] = {_mm256_unpacklo_epi8(lo4, hi4), _mm256_unpackhi_epi8(lo4, hi4),
                                  _mm256_unpacklo_epi8(lo_high, hi_high), _mm256_unpackhi_epi8(lo_high, hi_high)};
            for (int q = 0; q < R; q++) {
                int32_t x4;
                memcpy(&x4, xq + (r + q) * k + kk, 4);
                const __m256i xv = _mm256_shuffle_epi8(_mm256_set1_epi32(x4), pairing);
                for (int i = 0; i < 4; i++) s16[q][i] = _mm256_add_epi16(s16[q][i], _mm256_maddubs_epi16(u[i], xv));
            }
        }
        const float *sz = (const float *)((const uint32_t *)scales_zeros + g * n);
        for (int q = 0; q < R; q++) {
            const __m256 d = _mm256_set1_ps(xs[(r + q) * groups + g]), dz = _mm256_set1_ps(xsum[(r + q) * groups + g]);
            for (int i = 0; i < 4; i++) {
                __m256i sums = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[q][i])),
                                                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[q][i], 1)));
                acc[q][i] = add_scaled_sums(acc[q][i], sums, _mm256_loadu_ps(sz + rows[i]), d, dz);
            }
        }
    }
    for (int q = 0; q < R; q++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + (r + q) * n + rows[i], acc[q][i]);
}

/* Prompt rows (float32 ones where torch has no exact int8 matmul: lfm2vl/quant/int4.py) run two rows a
 * tile: with the rounding threaded, 1.6-2.0x the widened float32 GEMM for 512 rows (one row a tile:
 * 1.2-1.4x; four spilled registers and ran slower; docs/performance.md). */
HIDDEN void int4_rows_avx2(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *w,
                           const uint16_t *scales_zeros, float *y, int64_t m, int64_t n, int64_t k, int64_t block,
                           int threads) {
    const int64_t stride = block / 2, halves = block / 32, tasks = n / block * halves;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    /* activations (x0, x1, x2, x3) -> (x0, x2) pairs in the low 128 bits, (x1, x3) in the high */
    const __m256i pairing = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
                                             1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
    const float *sz = (const float *)scales_zeros;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t b = t / halves, h = t % halves;
        const uint8_t *blk = w + b * k * stride + h * 16;
        int64_t rows[4];  /* the first of the 8 rows each accumulator holds */
        for (int i = 0; i < 4; i++) rows[i] = b * block + h * 16 + (i & 1) * 8 + (i >> 1) * (block / 2);
        int64_t r = 0;
        for (; r + 2 <= m; r += 2) int4_tile(xq, xs, xsum, blk, sz, y, r, 2, n, k, stride, rows, low4, pairing);
        if (r < m) int4_tile(xq, xs, xsum, blk, sz, y, r, 1, n, k, stride, rows, low4, pairing);
    }
}

#endif /* HAVE_AVX2 */

#if defined(HAVE_VNNI) && defined(HAVE_AVX2)

/* ---- int8 decode rows: w (n, k) int8, one float32 scale a row (lfm2vl/quant) ----
 * y (m, n) float32 = w_scale * sum_g xs_g * sum_{k in g} xq_k w_k. vpdpbusd takes u8 x s8: |w| times
 * x with w's sign (|-128| is 128 as u8). xs16 (m, k / 4): each group's scale 8 times, the lanes its
 * products land in. */
HIDDEN void int8_rows_vnni(const int8_t *xq, const float *xs16, const int8_t *w, const float *w_scale, float *y,
                           int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t groups = k / 32;
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
                total += hsum8(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(sc + kk / 4)));
            }
            y[r * n + j] = total * w_scale[j];
        }
    }
}

/* ---- int4 decode rows, on torch's AVX-512 CPU int4 packing (lfm2vl/quant/int4.py), 64 rows a block ----
 *
 * The weight (n, k) is packed 64 output rows to a block: block b is (k, 32) bytes, byte [kk, j]
 * holding row 64b + j in its low nibble and row 64b + 32 + j in its high one (q in 0..15); the
 * scales (k / 32, n, 2) bf16 hold (scale, zero) per group of 32 inputs: w = (q - 8) * scale + zero.
 * With the activations rounded per group of 32 (above), one output row a lane:
 *   y = sum_g xs_g * (scale_g * sum_k xq_k q_k + (zero_g - 8 scale_g) * sum_k xq_k).
 * Four rows of 32 bytes (4 inputs x 64 outputs) are interleaved into lanes of 4 bytes by two rounds
 * of byte and word unpacking, which permutes the rows within the block; the scales are read and the
 * outputs written in the same order (add_scaled_sums: the float32 steps, shared with the AVX2 kernel). */

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

HIDDEN void int4_rows_vnni(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *w,
                           const uint16_t *scales_zeros, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t groups = k / 32, blocks = n / 64;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
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
                for (int i = 0; i < 8; i++)
                    acc[i] = add_scaled_sums(acc[i], sums[i], load_pairs(sz, (i & 3) * 4 + (i >> 2) * 32), d, dz);
            }
            for (int i = 0; i < 8; i++) store_rows(y + r * n + b * 64, (i & 3) * 4 + (i >> 2) * 32, acc[i]);
        }
    }
}

#endif /* HAVE_VNNI */

#ifdef HAVE_AVX2

/* ---- the kernels as a whole: activations rounded once, then any number of weights ---- */

int rounded_alloc(rounded_t *a, int64_t m, int64_t k) {
    const size_t groups = (size_t)(m * k / 32);
    a->xq = malloc((size_t)(m * k));
    a->xs = malloc(sizeof(float) * groups), a->xs16 = malloc(sizeof(float) * groups * 8);
    a->xsum = malloc(sizeof(float) * groups);
    a->m = m, a->k = k;
    if (a->xq && a->xs && a->xs16 && a->xsum) return 0;
    rounded_free(a);
    return -1;
}

void rounded_free(rounded_t *a) {
    free(a->xq), free(a->xs), free(a->xs16), free(a->xsum);
    a->xq = NULL, a->xs = a->xs16 = a->xsum = NULL;
}

void round_rows(const void *x, int x_bf16, int64_t m, int64_t k, rounded_t *a) {
    const int64_t groups = m * k / 32;
    quantize_groups(x, x_bf16, m, k, a->xq, a->xs, a->xsum);
    for (int64_t g = 0; g < groups; g++)
        for (int i = 0; i < 8; i++) a->xs16[g * 8 + i] = a->xs[g];
    a->m = m, a->k = k;
}

void int8_times(const rounded_t *a, const int8_t *w, const float *w_scale, float *y, int64_t n, int threads, int isa) {
#ifdef HAVE_VNNI
    if (isa == 2) {
        int8_rows_vnni(a->xq, a->xs16, w, w_scale, y, a->m, n, a->k, threads);
        return;
    }
#endif
    (void)isa; /* without VNNI there is one kernel */
    int8_rows_avx2(a->xq, a->xs16, w, w_scale, y, a->m, n, a->k, threads);
}

void int4_times(const rounded_t *a, const uint8_t *w, const uint16_t *scales_zeros, float *y, int64_t n, int64_t block,
                int threads, int isa) {
#ifdef HAVE_VNNI
    if (isa == 2 && block == 64) {
        int4_rows_vnni(a->xq, a->xs, a->xsum, w, scales_zeros, y, a->m, n, a->k, threads);
        return;
    }
#endif
    (void)isa;
    int4_rows_avx2(a->xq, a->xs, a->xsum, w, scales_zeros, y, a->m, n, a->k, block, threads);
}

/* x (m, k) float32 (bfloat16 where x_bf16) @ (w (n, k) int8 * w_scale (n,) float32, or bfloat16 where
 * scale_bf16)^T -> y (m, n) float32, k % 32 == 0; isa: 2 for the VNNI kernel, 1 for the AVX2 one.
 * Returns 0, or -1 without memory for the scratch. */
int int8_rows(const void *x, int x_bf16, const int8_t *w, const void *w_scale, int scale_bf16, float *y, int64_t m,
              int64_t n, int64_t k, int threads, int isa) {
    rounded_t a;
    float *scale32 = scale_bf16 ? malloc(sizeof(float) * (size_t)n) : NULL;
    if (rounded_alloc(&a, m, k) != 0 || (scale_bf16 && !scale32)) {
        rounded_free(&a), free(scale32);
        return -1;
    }
    round_rows(x, x_bf16, m, k, &a);
    const float *ws = w_scale;
    if (scale_bf16) {
        for (int64_t j = 0; j < n; j++) {
            uint32_t bits = (uint32_t)((const uint16_t *)w_scale)[j] << 16;
            memcpy(scale32 + j, &bits, 4);
        }
        ws = scale32;
    }
    int8_times(&a, w, ws, y, n, threads, isa);
    rounded_free(&a), free(scale32);
    return 0;
}

/* x (m, k) float32 (bfloat16 where x_bf16) @ W^T -> y (m, n) float32 for an int4 weight in torch's
 * packing of `block` rows (32 or 64; the VNNI kernel reads 64) and its (k / 32, n, 2) bf16 scales. */
int int4_rows(const void *x, int x_bf16, const uint8_t *w, const uint16_t *scales_zeros, float *y, int64_t m,
              int64_t n, int64_t k, int64_t block, int threads, int isa) {
    rounded_t a;
    if (rounded_alloc(&a, m, k) != 0) return -1;
    quantize_groups(x, x_bf16, m, k, a.xq, a.xs, a.xsum);  /* not round_rows: the int4 kernels read no xs16 */
    int4_times(&a, w, scales_zeros, y, n, block, threads, isa);
    rounded_free(&a);
    return 0;
}

#endif /* HAVE_AVX2 */
