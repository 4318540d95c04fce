/* int8 x int8 prompt rows on CPUs with AVX2 but no VNNI (lfm2vl/quant: Int8Linear's prompt path there).
 *
 * Prefill chunks and the vision tower multiply hundreds of rows by each weight, so they are bound by
 * arithmetic, not by memory. oneDNN's int8 matmul (torch._int_mm) is 70x slower than float32 on
 * such CPUs, so int8 layers used to widen their weights and multiply in float32. Here AVX2's
 * vpmaddubsw multiplies 32 u8 x s8 pairs per instruction, against 8 float32 multiply-adds for an
 * FMA: on a 2-core AVX2 EPYC about 1.5-2x MKL's float32 GEMM (docs/performance.md).
 *
 * Each row of x is rounded on its own to 7 bits of its max |x| (xq in -63..63, scale max / 63) and
 * stored as u8 xq + 64: vpmaddubsw sums pairs of products in int16 with saturation, and 7 bits keep
 * every pair below 2^15 (2 x 127 x 127 = 32,258), so the int32 sums are exact; the + 64 comes off as
 * 64 * sum_k w[j, k]. 8 bits would overflow those pairs, and the signed alternative (vpsignb a pair)
 * needs a fourth instruction and more registers than AVX2 has. So a row's outputs are
 * xs[r] * w_scale[j] * (sum_k xu[r, k] w[j, k] - 64 * sum_k w[j, k]), exact in int32 and the same
 * bits whatever rows are beside it and however many threads run.
 *
 * Blocking: 64 weight rows at a time (64 x k bytes, in L2), every 3-row tile of x against them in
 * 3 x 2 register tiles (6 accumulators, 3 rows of x, 2 of weights, all in registers). 4 x 2 tiles
 * left gcc reloading rows of x for each weight row (16 loads a step of 32 inputs, against 5) and
 * ran 20-30% slower; 3 x 3 no faster. Threads: OpenMP over the 64-row blocks.
 */

#include "kernels.h"

#ifdef HAVE_AVX2

#define GEMM_ROWS 3   /* rows of x a register tile */
#define GEMM_COLS 2   /* weight rows a register tile */
#define GEMM_BLOCK 64 /* weight rows a thread's block */
#define XQ_MAX 63     /* 7 bits */

static inline int32_t hsum8i(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(h);
}

/* x (m, k) float32 -> xu (m, k) u8 = round(x / xs) + 64 (nearest even), xs (m,) = max|x| / 63 */
static void round_rows7(const float *x, int64_t m, int64_t k, uint8_t *xu, float *xs, int threads) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i offset = _mm256_set1_epi8(XQ_MAX + 1);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        __m256 top = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(row + i), magnitude));
        const float biggest = hmax8(top);
        const float scale = biggest > 0 ? biggest / XQ_MAX : 1.0f;
        xs[r] = biggest > 0 ? scale : 0.0f;
        const __m256 divisor = _mm256_set1_ps(scale);
        for (int64_t i = 0; i < k; i += 32) { /* 4 x 8 floats -> 32 bytes */
            __m256i q[4];
            for (int j = 0; j < 4; j++)
                q[j] = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + i + 8 * j), divisor));
            __m256i words = _mm256_packs_epi32(q[0], q[1]), words2 = _mm256_packs_epi32(q[2], q[3]);
            __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2), order);
            _mm256_storeu_si256((__m256i *)(xu + r * k + i), _mm256_add_epi8(bytes, offset));
        }
    }
}

/* out[r][c] = sum_k a[r * k + kk] * w[c * k + kk] for R rows of xu and C weight rows (R <= 3, C <= 2) */
static inline __attribute__((always_inline)) void tile(const uint8_t *a, const int8_t *w, int64_t k, int R, int C,
                                                       int32_t out[GEMM_ROWS][GEMM_COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[GEMM_ROWS][GEMM_COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < k; kk += 32) {
        __m256i av[GEMM_ROWS];
        for (int r = 0; r < R; r++) av[r] = _mm256_loadu_si256((const __m256i *)(a + r * k + kk));
        for (int c = 0; c < C; c++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + c * k + kk));
            for (int r = 0; r < R; r++)
                acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(av[r], wv), ones));
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[r][c] = hsum8i(acc[r][c]);
}

/* y rows [r, r + R) x weight rows [j, j + C): the tile's sums, offset and scaled */
static inline __attribute__((always_inline)) void tile_out(const uint8_t *xu, const float *xs, const int8_t *w,
                                                           const float *w_scale, const int32_t *wsum, float *y,
                                                           int64_t r, int64_t j, int64_t n, int64_t k, int R, int C) {
    int32_t out[GEMM_ROWS][GEMM_COLS];
    tile(xu + r * k, w + j * k, k, R, C, out);
    for (int i = 0; i < R; i++)
        for (int c = 0; c < C; c++)
            y[(r + i) * n + j + c] = xs[r + i] * w_scale[j + c] * (float)(out[i][c] - (XQ_MAX + 1) * wsum[j + c]);
}

/* sum_k w[j, k] for one weight row (vpmaddubsw of 1s by the weights: exact) */
static int32_t row_sum(const int8_t *w, int64_t k) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < k; kk += 32)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
            _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(w + kk))), ones16));
    return hsum8i(acc);
}

/* x (m, k) float32 @ (w (n, k) int8 * w_scale (n,) float32)^T -> y (m, n) float32, k % 32 == 0.
 * Returns 0, or -1 without memory for the scratch (the rounded rows: m * k bytes). */
int int8_gemm(const float *x, const int8_t *w, const float *w_scale, float *y, int64_t m, int64_t n, int64_t k,
              int threads) {
    uint8_t *xu = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)m);
    int32_t *wsum = malloc(sizeof(int32_t) * (size_t)n);
    if (!xu || !xs || !wsum) {
        free(xu), free(xs), free(wsum);
        return -1;
    }
    round_rows7(x, m, k, xu, xs, threads);
    const int64_t blocks = (n + GEMM_BLOCK - 1) / GEMM_BLOCK;
    const int64_t full_rows = m / GEMM_ROWS * GEMM_ROWS;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t j0 = b * GEMM_BLOCK, j1 = j0 + GEMM_BLOCK < n ? j0 + GEMM_BLOCK : n;
        const int64_t pairs_end = j0 + (j1 - j0) / GEMM_COLS * GEMM_COLS;
        for (int64_t j = j0; j < j1; j++) wsum[j] = row_sum(w + j * k, k);
        for (int64_t r = 0; r < full_rows; r += GEMM_ROWS) {
            for (int64_t j = j0; j < pairs_end; j += GEMM_COLS) tile_out(xu, xs, w, w_scale, wsum, y, r, j, n, k, GEMM_ROWS, 2);
            if (pairs_end < j1) tile_out(xu, xs, w, w_scale, wsum, y, r, pairs_end, n, k, GEMM_ROWS, 1);
        }
        for (int64_t r = full_rows; r < m; r++) { /* the last rows (fewer than a tile), one at a time */
            for (int64_t j = j0; j < pairs_end; j += GEMM_COLS) tile_out(xu, xs, w, w_scale, wsum, y, r, j, n, k, 1, 2);
            if (pairs_end < j1) tile_out(xu, xs, w, w_scale, wsum, y, r, pairs_end, n, k, 1, 1);
        }
    }
    free(xu), free(xs), free(wsum);
    return 0;
}

#endif /* HAVE_AVX2 */
