/* The arithmetic ceiling of an exact int8 x int8 GEMM on an AVX2 CPU without VNNI, against float32 FMA
 * (a benchmark, not a test; docs/performance.md "int8 prompt rows in C").
 *
 *     gcc -O3 -mavx2 -mfma -fopenmp benchmarks/avx2_int8_ceiling.c -o /tmp/ceiling && /tmp/ceiling
 *
 * Register-only loops, no memory traffic, every core busy (OpenMP, as many threads as OMP_NUM_THREADS):
 * - float32: independent FMAs (8 multiply-adds each);
 * - int8, lfm2vl/native/gemm.c's inner step for a 3 x 2 register tile: |w| (vpabsb) times x with w's
 *   sign (vpsignb) by vpmaddubsw (32 multiply-adds, pairs summed in int16), pairs to int32 by
 *   vpmaddwd, added into int32 accumulators;
 * - int8 without the sign step (7-bit rows, x + 64 unsigned: not exact for 8-bit rows, for reference).
 * Prints multiply-adds per nanosecond for the whole machine and the int8 / float32 ratio: what an int8
 * GEMM could gain over a float32 one here at best. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 50000000L
#define OPAQUE(v) __asm__ volatile("" : "+x"(v))

static double fma_rate(void) {
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        __m256 a[10], b = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(1e-9f);
        for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps((float)i);
        double t = now();
        for (long i = 0; i < N; i++) {
            OPAQUE(b);
            for (int j = 0; j < 10; j++) a[j] = _mm256_fmadd_ps(a[j], b, c);
        }
        t = now() - t;
        float s = 0;
        for (int i = 0; i < 10; i++) s += a[i][0];
        total += 10.0 * 8 * N / t / 1e9 + (s == 12345.0f);
    }
    return total;
}

static double int8_rate(int sign) {
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i x0 = _mm256_set1_epi8(3), x1 = _mm256_set1_epi8(-4), x2 = _mm256_set1_epi8(5);
        __m256i w0 = _mm256_set1_epi8(-7), w1 = _mm256_set1_epi8(9), acc[6];
        for (int i = 0; i < 6; i++) acc[i] = _mm256_setzero_si256();
        double t = now();
        for (long i = 0; i < N; i++) {
            OPAQUE(x0); OPAQUE(x1); OPAQUE(x2); OPAQUE(w0); OPAQUE(w1);
            /* one 32-input step of a 3 x 2 tile: 6 multiply-add groups on 3 rows of x and 2 of w */
#define STEP(A, X, W) A = _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_maddubs_epi16(sign ? _mm256_abs_epi8(W) : W, \
                                                                               sign ? _mm256_sign_epi8(X, W) : X), ones))
            STEP(acc[0], x0, w0); STEP(acc[1], x0, w1); STEP(acc[2], x1, w0);
            STEP(acc[3], x1, w1); STEP(acc[4], x2, w0); STEP(acc[5], x2, w1);
        }
        t = now() - t;
        int s = 0;
        for (int i = 0; i < 6; i++) s += _mm256_extract_epi32(acc[i], 0);
        total += 6.0 * 32 * N / t / 1e9 + (s == 12345);
    }
    return total;
}

int main(void) {
    printf("threads %d\n", omp_get_max_threads());
    double f = fma_rate(), s = int8_rate(1), u = int8_rate(0);
    printf("float32 FMA:               %6.1f G multiply-adds/s\n", f);
    printf("int8, |w| x sign(x, w):    %6.1f G multiply-adds/s  (%.2fx float32)\n", s, s / f);
    printf("int8, no sign step (7-bit): %5.1f G multiply-adds/s  (%.2fx float32)\n", u, u / f);
    return 0;
}
