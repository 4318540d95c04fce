/* int8 x int8 prompt rows on CPUs with AVX2 but no VNNI (lfm2vl/quant: Int8Linear's prompt path there).
 *
 * Prefill chunks and the vision tower multiply hundreds of rows by each weight, so they are bound by
 * arithmetic, not by memory. oneDNN's int8 matmul (torch._int_mm) is 70x slower than float32 on
 * such CPUs, so int8 layers used to widen their weights and multiply in float32. Here AVX2's
 * vpmaddubsw multiplies 32 u8 x s8 pairs per instruction, against 8 float32 multiply-adds for an
 * FMA: on a 2-core AVX2 EPYC (Zen 3) 1.1-1.7x MKL's float32 GEMM (docs/performance.md).
 *
 * The rows are rounded as on VNNI CPUs (lfm2vl/quant: int8_dynamic_linear): each on its own to int8,
 * scale max(max|x|, 1e-12) / 127, nearest even; the products are summed exactly in int32 and scaled
 * as there, float32(sum) * row scale * weight scale: the same bits as that path, whatever the rows
 * beside and however many threads run. vpmaddubsw takes one unsigned operand and sums pairs in int16
 * with saturation, so it gets |w| and x with w's sign (vpsignb): pairs of at most 2 x 127 x 127 <
 * 2^15. (Rounding rows to 7 bits, stored as x + 64, saves that vpsignb and ran 10-20% faster, but
 * cost the bundled model 2.3 points of teacher-forced agreement with fp32; not kept.)
 *
 * Blocking: 64 weight rows at a time (64 x k bytes, in L2), every 3-row tile of x against them in
 * 3 x 2 register tiles (6 accumulators, 3 rows of x, 2 weight rows and their |w|, all in registers).
 * 4 x 2 tiles left gcc reloading rows of x for each weight row and ran 20-30% slower; 3 x 3 no
 * faster. Threads: OpenMP over the 64-row blocks.
 */

#include "kernels.h"

#ifdef HAVE_AVX2

#define GEMM_ROWS 3   /* rows of x a register tile */
#define GEMM_COLS 2   /* weight rows a register tile */
#define GEMM_BLOCK 64 /* weight rows a thread's block */

/* x (m, k) float32 -> xq (m, k) int8 = round(x / xs) (nearest even), xs (m,) = max(max|x|, 1e-12) / 127 */
static void round_whole_rows(const float *x, int64_t m, int64_t k, int8_t *xq, float *xs, int threads) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const int64_t whole = k / 32 * 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        __m256 top = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int64_t i = 0; i < whole; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float biggest = hmax8(top);
        int has_nan = _mm256_movemask_ps(nan) != 0;  /* any lane NaN (any_nan8, kernels.h) */
        for (int64_t i = whole; i < k; i++) {
            biggest = fabsf(row[i]) > biggest ? fabsf(row[i]) : biggest;
            has_nan |= isnan(row[i]);
        }
        const float scale = has_nan ? NAN : (biggest > 1e-12f ? biggest : 1e-12f) / 127.0f;
        xs[r] = scale;
        const __m256 divisor = _mm256_set1_ps(scale);
        for (int64_t i = 0; i < whole; i += 32) {
            const __m256 v[4] = {_mm256_loadu_ps(row + i), _mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(row + i + 16),
                                 _mm256_loadu_ps(row + i + 24)};
            __m256i q[4];
            round32(v, divisor, xq + r * k + i, q);
        }
        for (int64_t i = whole; i < k; i++) xq[r * k + i] = (int8_t)nearbyintf(row[i] / scale); /* nearest even */
    }
}

/* out[r][c] = sum_k a[r * k + kk] * w[c * k + kk] for R rows of xq and C weight rows (R <= 3, C <= 2):
 * whole vectors of 32 inputs, then the last k % 32 one at a time */
static inline __attribute__((always_inline)) void tile(const int8_t *a, const int8_t *w, int64_t k, int R, int C,
                                                       int32_t out[GEMM_ROWS][GEMM_COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t whole = k / 32 * 32;
    __m256i acc[GEMM_ROWS][GEMM_COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < whole; kk += 32) {
        __m256i av[GEMM_ROWS];
        for (int r = 0; r < R; r++) av[r] = _mm256_loadu_si256((const __m256i *)(a + r * k + kk));
        for (int c = 0; c < C; c++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + c * k + kk)), wabs = _mm256_abs_epi8(wv);
            for (int r = 0; r < R; r++) {
                const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(av[r], wv));
                acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            int32_t sum = hsum8i(acc[r][c]);
            for (int64_t kk = whole; kk < k; kk++) sum += (int32_t)a[r * k + kk] * w[c * k + kk];
            out[r][c] = sum;
        }
}

/* y rows [r, r + R) x weight rows [j, j + C): the tile's sums, scaled */
static inline __attribute__((always_inline)) void tile_out(const int8_t *xq, const float *xs, const int8_t *w,
                                                           const float *w_scale, const float *bias, float *y,
                                                           int64_t r, int64_t j, int64_t n, int64_t k, int R, int C) {
    int32_t out[GEMM_ROWS][GEMM_COLS];
    tile(xq + r * k, w + j * k, k, R, C, out);
    for (int i = 0; i < R; i++)
        for (int c = 0; c < C; c++) {
            const float v = (float)out[i][c] * xs[r + i] * w_scale[j + c];
            y[(r + i) * n + j + c] = bias ? v + bias[j + c] : v;
        }
}

/* x (m, k) float32 @ (w (n, k) int8 * w_scale (n,) float32)^T (+ bias (n,) float32, or NULL) -> y (m, n)
 * float32, any k >= 1; the bias added after the scaling, as torch's y + bias (the same bits).
 * Returns 0, or -1 without memory for the scratch (the rounded rows: m * k bytes). */
int int8_gemm(const float *x, const int8_t *w, const float *w_scale, const float *bias, float *y, int64_t m,
              int64_t n, int64_t k, int threads) {
    int8_t *xq = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)m);
    if (!xq || !xs) {
        free(xq), free(xs);
        return -1;
    }
    round_whole_rows(x, m, k, xq, xs, threads);
    const int64_t blocks = (n + GEMM_BLOCK - 1) / GEMM_BLOCK;
    const int64_t full_rows = m / GEMM_ROWS * GEMM_ROWS;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t j0 = b * GEMM_BLOCK, j1 = j0 + GEMM_BLOCK < n ? j0 + GEMM_BLOCK : n;
        const int64_t pairs_end = j0 + (j1 - j0) / GEMM_COLS * GEMM_COLS;
        for (int64_t r = 0; r < full_rows; r += GEMM_ROWS) {
            for (int64_t j = j0; j < pairs_end; j += GEMM_COLS) tile_out(xq, xs, w, w_scale, bias, y, r, j, n, k, GEMM_ROWS, 2);
            if (pairs_end < j1) tile_out(xq, xs, w, w_scale, bias, y, r, pairs_end, n, k, GEMM_ROWS, 1);
        }
        for (int64_t r = full_rows; r < m; r++) { /* the last rows (fewer than a tile), one at a time */
            for (int64_t j = j0; j < pairs_end; j += GEMM_COLS) tile_out(xq, xs, w, w_scale, bias, y, r, j, n, k, 1, 2);
            if (pairs_end < j1) tile_out(xq, xs, w, w_scale, bias, y, r, pairs_end, n, k, 1, 1);
        }
    }
    free(xq), free(xs);
    return 0;
}

#endif /* HAVE_AVX2 */
