/* What kernels.c and step.c share: the instruction sets they are built for, the decode kernels over
 * activations already rounded to int8 per group of 32 (kernels.c says how and why), and two
 * horizontal reductions. Internal to the built library (hidden from its exported symbols). */

#ifndef LFM2VL_KERNELS_H
#define LFM2VL_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#endif

#define HIDDEN __attribute__((visibility("hidden")))

#ifdef HAVE_AVX2

static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline int32_t hsum8i(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(h);
}

/* 32 floats v[0..3] / divisor, rounded to nearest even -> dst[0..31] int8 (saturating; callers keep
 * |v / divisor| <= 127); q: the 32 values as int32, for sums of them. The activations' rounding of
 * every kernel (kernels.c's groups of 32, gemm.c's whole rows). */
static inline void round32(const __m256 v[4], __m256 divisor, int8_t *dst, __m256i q[4]) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(bytes, order));
}

/* whether any lane of v is NaN: a row with one rounds to a NaN scale, so that its outputs are NaN, as
 * a float32 product's would be (the max over |x| drops NaN, and int8 holds none) */
static inline int any_nan8(__m256 v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }

static inline float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* x (m, k) -> xq (m, k) int8, xs (m, k / 32) scales, xsum (m, k / 32) scale * sum of the group (or NULL) */
HIDDEN void quantize_groups(const void *x, int x_bf16, int64_t m, int64_t k, int8_t *xq, float *xs, float *xsum);
/* y (m, n) = xq (m, k) @ (w (n, k) int8 * w_scale (n,))^T; xs16: each group's scale 8 times */
HIDDEN void int8_rows_avx2(const int8_t *xq, const float *xs16, const int8_t *w, const float *w_scale, float *y,
                           int64_t m, int64_t n, int64_t k, int threads);
/* y (m, n) = xq (m, k) @ W^T for an int4 weight in torch's packing of `block` (32 or 64) rows */
HIDDEN void int4_rows_avx2(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *w,
                           const uint16_t *scales_zeros, float *y, int64_t m, int64_t n, int64_t k, int64_t block,
                           int threads);

/* activations rounded to int8 per group of 32 (quantize_groups), the form every kernel reads:
 * xq (m, k), xs and xsum (m, k / 32), xs16 (m, k / 4: each scale 8 times, the int8 kernels' lanes) */
typedef struct {
    int8_t *xq;
    float *xs, *xs16, *xsum;
    int64_t m, k;
} rounded_t;

/* scratch for m rows of k (0, or -1 without memory: then nothing is held) */
HIDDEN int rounded_alloc(rounded_t *a, int64_t m, int64_t k);
HIDDEN void rounded_free(rounded_t *a);
/* x (m, k) float32 (bfloat16 where x_bf16) rounded into a (allocated for at least m * k) */
HIDDEN void round_rows(const void *x, int x_bf16, int64_t m, int64_t k, rounded_t *a);
/* y (a.m, n) = a @ W^T, with the kernel for `isa` (2: VNNI, 1: AVX2) and, for int4, the packing */
HIDDEN void int8_times(const rounded_t *a, const int8_t *w, const float *w_scale, float *y, int64_t n, int threads,
                       int isa);
HIDDEN void int4_times(const rounded_t *a, const uint8_t *w, const uint16_t *scales_zeros, float *y, int64_t n,
                       int64_t block, int threads, int isa);
#endif

#if defined(HAVE_VNNI) && defined(HAVE_AVX2)
HIDDEN void int8_rows_vnni(const int8_t *xq, const float *xs16, const int8_t *w, const float *w_scale, float *y,
                           int64_t m, int64_t n, int64_t k, int threads);
/* the 64-row packing only */
HIDDEN void int4_rows_vnni(const int8_t *xq, const float *xs, const float *xsum, const uint8_t *w,
                           const uint16_t *scales_zeros, float *y, int64_t m, int64_t n, int64_t k, int threads);
#endif

#endif /* LFM2VL_KERNELS_H */
