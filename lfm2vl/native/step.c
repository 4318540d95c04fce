/* One decode step of LFM2's language model in C, for quantized models (lfm2vl/quant/step.py builds
 * the layer table from the model's own tensors and calls `decode_step`; the caches are the engine's
 * own tensors, written in place).
 *
 * Why: a decode step of the 450M multiplies one row by ~350 M int8 or int4 weights (the kernels in
 * kernels.c stream them at about the memory's rate), and around those 93 matmuls torch ran ~1,500 small
 * operations (norms, residuals, the conv taps, RoPE, the cache writes, attention's matmuls and
 * softmax) at 2-5 us each, plus a ctypes call and an OpenMP wake-up a matmul: on a 2-core AVX2 EPYC
 * 8-10 ms of a 22-25 ms step (docs/performance.md). Here the whole step is one call: the same kernels
 * on the same int8-rounded activations (each activation is quantized once for the layers that read it:
 * q/k/v, w1/w3), and everything between them in float32, in the order torch computes it except for
 * the order of the sums in the norms, the softmax and attention's dot products.
 *
 * A step takes B rows, each one sequence at its own length: row r is cache slot slots[r] at position
 * positions[r] (its stored tokens before this one); it attends over its own positions 0..positions[r].
 * Float32 throughout: activations, norms, conv weights, K/V, cos/sin; for a bf16 model the Python side
 * hands over float32 copies of its small tensors, and only the conv states stay bf16 (the cache's:
 * read widened, written rounded to nearest even), so a bf16 model's step is computed in float32
 * where torch's rounds each operation to bf16.
 */

#include "kernels.h"

#ifdef HAVE_AVX2

#define MAX_HEAD_DIM 512  /* lfm2vl/native/step.py: MAX_HEAD_DIM, MAX_CONV_K */
#define MAX_CONV_K 16

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's cast (no NaN here to keep) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

typedef struct {
    int32_t kind;        /* 1: int8, w (n, k), scale (n,) float32; 2: int4, torch's packing of `block` rows,
                            scale = scales_zeros (k / 32, n, 2) bf16 */
    int32_t _pad;
    int64_t n, k, block;
    const void *w, *scale;
    const float *bias;   /* (n,) or NULL */
} qlinear_t;

typedef struct {
    int32_t attention;
    int32_t _pad;
    const float *operator_norm, *ffn_norm;  /* (D,) */
    qlinear_t op[4];                        /* conv: in_proj, out_proj; attention: q, k, v, out_proj */
    qlinear_t w1, w3, w2;
    const float *conv_w, *conv_b;           /* (D, K) and (D,) or NULL */
    const float *q_norm, *k_norm;           /* (Dh,) */
    float *kt, *v;                          /* K^T (S, Hkv, Dh, L) and V (S, Hkv, L, Dh) */
    void *conv_state;                       /* (S, D, K - 1), float32 or bfloat16 (model_t.state_bf16) */
} layer_t;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, conv_k, max_len;
    float eps;
    int32_t state_bf16;        /* the conv states are bfloat16 (a bf16 model's cache), else float32 */
    const float *final_norm;   /* (D,) */
    const float *cos, *sin;    /* (L, Dh): RoPE tables, "rotate-half" layout */
    const layer_t *layers;
} model_t;

/* y (m, n) = a @ W^T (+ bias) */
static void qlinear(const qlinear_t *l, const rounded_t *a, float *y, int threads, int isa) {
    if (l->kind == 1) int8_times(a, l->w, l->scale, y, l->n, threads, isa);
    else int4_times(a, l->w, l->scale, y, l->n, l->block, threads, isa);
    if (l->bias)
        for (int64_t r = 0; r < a->m; r++)
            for (int64_t j = 0; j < l->n; j++) y[r * l->n + j] += l->bias[j];
}

/* exp(x), 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), within
 * 2 ulp of expf over the range a softmax and SiLU use; inputs below -87 give exp(-87), not 0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) {
    float lanes[8];
    _mm256_storeu_ps(lanes, exp8(_mm256_set1_ps(x)));
    return lanes[0];
}

/* y (m, d) = x * (1 / sqrt(mean(x^2) + eps)) * w, row by row (torch's rms_norm: the same steps) */
static void rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t d, float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sum = hsum8(acc);
        for (; i < d; i++) sum += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(sum / (float)d + eps);
        for (i = 0; i < d; i++) yr[i] = xr[i] * inv * w[i];
    }
}

/* x (Dh,) rotated in place at one position: x * cos + rotate_half(x) * sin */
static void rope(float *x, const float *cos, const float *sin, int64_t dh) {
    const int64_t half = dh / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* softmax of n scores in place, in float32: exp(s - max) / sum */
static void softmax(float *scores, int64_t n) {
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) top = scores[j] > top ? scores[j] : top;
    __m256 vtop = _mm256_set1_ps(top), vsum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vtop));
        _mm256_storeu_ps(scores + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float total = hsum8(vsum);
    for (; j < n; j++) total += (scores[j] = exp1(scores[j] - top));
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(scores + j, _mm256_mul_ps(_mm256_loadu_ps(scores + j), inv));
    for (; j < n; j++) scores[j] *= 1.0f / total;
}

/* The G (1..4) query heads q (G, Dh) that share one K/V head, over its sequence's n keys:
 * o_g = softmax(q_g K / sqrt(Dh)) V, with K and V each read once for all G heads (grouped-query
 * attention: the 450M's 16 query heads share 8). scores: (G, n). W vectors of 8 keys (then of 8
 * values) a pass: 4 for up to two heads, 2 for more, so that the G x W sums stay in registers. */
static inline __attribute__((always_inline)) void attend_group(const int G, const float *q, const float *kt,
                                                              const float *v, int64_t n, int64_t dh,
                                                              int64_t stride, float *scores, float *o) {
    const int W = G <= 2 ? 4 : 2;
    const float scale = 1.0f / sqrtf((float)dh);
    float qs[4 * MAX_HEAD_DIM];
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < dh; d++) qs[g * dh + d] = q[g * dh + d] * scale;
    int64_t j = 0;
    for (; j + 8 * W <= n; j += 8 * W) {  /* K^T: Dh rows of `stride` keys */
        __m256 acc[4][4];
        for (int g = 0; g < G; g++)
            for (int i = 0; i < W; i++) acc[g][i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dh; d++) {
            const float *row = kt + d * stride + j;
            __m256 k[4];
            for (int i = 0; i < W; i++) k[i] = _mm256_loadu_ps(row + 8 * i);
            for (int g = 0; g < G; g++) {
                __m256 qd = _mm256_broadcast_ss(qs + g * dh + d);
                for (int i = 0; i < W; i++) acc[g][i] = _mm256_fmadd_ps(qd, k[i], acc[g][i]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int i = 0; i < W; i++) _mm256_storeu_ps(scores + g * n + j + 8 * i, acc[g][i]);
    }
    for (; j < n; j++)
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t d = 0; d < dh; d++) s += qs[g * dh + d] * kt[d * stride + j];
            scores[g * n + j] = s;
        }
    for (int g = 0; g < G; g++) softmax(scores + g * n, n);
    int64_t d0 = 0;
    for (; d0 + 8 * W <= dh; d0 += 8 * W) {  /* V: n rows of Dh values, 8 W of them a pass */
        __m256 acc[4][4];
        for (int g = 0; g < G; g++)
            for (int i = 0; i < W; i++) acc[g][i] = _mm256_setzero_ps();
        for (j = 0; j < n; j++) {
            const float *row = v + j * dh + d0;
            __m256 x[4];
            for (int i = 0; i < W; i++) x[i] = _mm256_loadu_ps(row + 8 * i);
            for (int g = 0; g < G; g++) {
                __m256 pj = _mm256_broadcast_ss(scores + g * n + j);
                for (int i = 0; i < W; i++) acc[g][i] = _mm256_fmadd_ps(pj, x[i], acc[g][i]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int i = 0; i < W; i++) _mm256_storeu_ps(o + g * dh + d0 + 8 * i, acc[g][i]);
    }
    for (; d0 < dh; d0++)
        for (int g = 0; g < G; g++) {
            float acc = 0.0f;
            for (j = 0; j < n; j++) acc += scores[g * n + j] * v[j * dh + d0];
            o[g * dh + d0] = acc;
        }
}

/* heads [h0, h0 + count) of one K/V head, four at a time (attend_group with a constant G) */
static void attend(int64_t count, const float *q, const float *kt, const float *v, int64_t n, int64_t dh,
                   int64_t stride, float *scores, float *o) {
    for (int64_t done = 0; done < count;) {
        const int64_t g = count - done < 4 ? count - done : 4;
        const float *qg = q + done * dh;
        float *sg = scores + done * n, *og = o + done * dh;
        switch (g) {
            case 1: attend_group(1, qg, kt, v, n, dh, stride, sg, og); break;
            case 2: attend_group(2, qg, kt, v, n, dh, stride, sg, og); break;
            case 3: attend_group(3, qg, kt, v, n, dh, stride, sg, og); break;
            default: attend_group(4, qg, kt, v, n, dh, stride, sg, og); break;
        }
        done += g;
    }
}

/* silu(a) * b into a, n values */
static void silu_mul(float *a, const float *b, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(a + i);
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(b + i)));
    }
    for (; i < n; i++) a[i] = a[i] / (1.0f + exp1(-a[i])) * b[i];
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* x (B, D) the new tokens' embeddings -> out (B, D) the final norm's output; writes each row's K/V at
 * its position and its conv states. Returns 0, -1 without memory, -2 for a shape it does not take. */
int decode_step(const model_t *md, const float *x_in, float *out, int64_t b, const int64_t *slots,
                const int64_t *positions, int threads, int isa) {
    const int64_t D = md->hidden, H = md->heads, Hkv = md->kv_heads, Dh = md->head_dim, K = md->conv_k, L = md->max_len;
    if (Dh > MAX_HEAD_DIM || H % Hkv || K < 2 || K > MAX_CONV_K) return -2;
    int64_t wide = 3 * D, deep = D;  /* the most outputs and inputs of any layer */
    for (int64_t i = 0; i < md->n_layers; i++) {
        const layer_t *ly = &md->layers[i];
        const qlinear_t *ls[7] = {&ly->op[0], &ly->op[1], &ly->w1, &ly->w3, &ly->w2, &ly->op[2], &ly->op[3]};
        for (int j = 0; j < (ly->attention ? 7 : 5); j++) {
            if (ls[j]->k % 32) return -2;
            wide = max64(wide, ls[j]->n), deep = max64(deep, ls[j]->k);
        }
    }
    float *x = malloc(sizeof(float) * (size_t)(b * D)), *h = malloc(sizeof(float) * (size_t)(b * D));
    float *p1 = malloc(sizeof(float) * (size_t)(b * wide)), *p2 = malloc(sizeof(float) * (size_t)(b * wide));
    float *p3 = malloc(sizeof(float) * (size_t)(b * wide)), *z = malloc(sizeof(float) * (size_t)(b * deep));
    float *scores = malloc(sizeof(float) * (size_t)(b * H * L));
    rounded_t a;  /* every layer's input, rounded: at most B rows of the widest input */
    const int have_a = rounded_alloc(&a, b, deep) == 0;
    int status = -1;
    if (!(x && h && p1 && p2 && p3 && z && scores && have_a)) goto done;
    memcpy(x, x_in, sizeof(float) * (size_t)(b * D));
    for (int64_t li = 0; li < md->n_layers; li++) {
        const layer_t *ly = &md->layers[li];
        rms_norm(x, ly->operator_norm, h, b, D, md->eps);
        round_rows(h, 0, b, D, &a);
        if (ly->attention) {
            const int64_t G = H / Hkv;
            qlinear(&ly->op[0], &a, p1, threads, isa);  /* q (B, H * Dh) */
            qlinear(&ly->op[1], &a, p2, threads, isa);  /* k (B, Hkv * Dh) */
            qlinear(&ly->op[2], &a, p3, threads, isa);  /* v (B, Hkv * Dh) */
            rms_norm(p1, ly->q_norm, p1, b * H, Dh, md->eps);
            rms_norm(p2, ly->k_norm, p2, b * Hkv, Dh, md->eps);
            for (int64_t r = 0; r < b; r++) {
                const int64_t pos = positions[r];
                const float *c = md->cos + pos * Dh, *s = md->sin + pos * Dh;
                for (int64_t hh = 0; hh < H; hh++) rope(p1 + (r * H + hh) * Dh, c, s, Dh);
                for (int64_t g = 0; g < Hkv; g++) {
                    float *kr = p2 + (r * Hkv + g) * Dh, *vr = p3 + (r * Hkv + g) * Dh;
                    rope(kr, c, s, Dh);
                    float *kt = ly->kt + ((slots[r] * Hkv + g) * Dh) * L, *vc = ly->v + ((slots[r] * Hkv + g) * L) * Dh;
                    for (int64_t d = 0; d < Dh; d++) kt[d * L + pos] = kr[d];
                    memcpy(vc + pos * Dh, vr, sizeof(float) * (size_t)Dh);
                }
            }
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
            for (int64_t r = 0; r < b; r++)
                for (int64_t g = 0; g < Hkv; g++)  /* query heads g * G .. g * G + G - 1 share K/V head g */
                    attend(G, p1 + (r * H + g * G) * Dh, ly->kt + ((slots[r] * Hkv + g) * Dh) * L,
                           ly->v + ((slots[r] * Hkv + g) * L) * Dh, positions[r] + 1, Dh, L,
                           scores + (r * H + g * G) * L, z + (r * H + g * G) * Dh);
            round_rows(z, 0, b, H * Dh, &a);
            qlinear(&ly->op[3], &a, p1, threads, isa);
        } else {
            qlinear(&ly->op[0], &a, p1, threads, isa);  /* (B, 3D): B, C, x */
            for (int64_t r = 0; r < b; r++) {
                const float *gb = p1 + r * 3 * D, *gc = gb + D, *xs = gb + 2 * D;
                for (int64_t c = 0; c < D; c++) {
                    const int64_t at = (slots[r] * D + c) * (K - 1);
                    float st[MAX_CONV_K];  /* [stored state | this token's B*x] */
                    for (int64_t i = 0; i < K - 1; i++)
                        st[i] = md->state_bf16 ? from_bf16(((uint16_t *)ly->conv_state)[at + i]) : ((float *)ly->conv_state)[at + i];
                    st[K - 1] = gb[c] * xs[c];
                    const float *w = ly->conv_w + c * K;
                    float y = st[0] * w[0];
                    for (int64_t i = 1; i < K; i++) y += st[i] * w[i];
                    if (ly->conv_b) y += ly->conv_b[c];
                    for (int64_t i = 0; i < K - 1; i++) {
                        if (md->state_bf16) ((uint16_t *)ly->conv_state)[at + i] = to_bf16(st[i + 1]);
                        else ((float *)ly->conv_state)[at + i] = st[i + 1];
                    }
                    z[r * D + c] = gc[c] * y;
                }
            }
            round_rows(z, 0, b, D, &a);
            qlinear(&ly->op[1], &a, p1, threads, isa);
        }
        for (int64_t i = 0; i < b * D; i++) x[i] += p1[i];
        rms_norm(x, ly->ffn_norm, h, b, D, md->eps);
        round_rows(h, 0, b, D, &a);
        const int64_t F = ly->w1.n;
        qlinear(&ly->w1, &a, p1, threads, isa);
        qlinear(&ly->w3, &a, p2, threads, isa);
        silu_mul(p1, p2, b * F);
        round_rows(p1, 0, b, F, &a);
        qlinear(&ly->w2, &a, p2, threads, isa);
        for (int64_t i = 0; i < b * D; i++) x[i] += p2[i];
    }
    rms_norm(x, md->final_norm, out, b, D, md->eps);
    status = 0;
done:
    free(x), free(h), free(p1), free(p2), free(p3), free(z), free(scores);
    if (have_a) rounded_free(&a);
    return status;
}

#endif /* HAVE_AVX2 */
