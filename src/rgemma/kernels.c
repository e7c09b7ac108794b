/* The work of a decode step (few rows) on the CPU with weights stored narrower
 * than the float32 activations: the products with int8 (weight-only quantized)
 * and bfloat16 weights, below; the product with int4 weights (W4A8) and the
 * recurrent block's step between its products, in their own sections further
 * down, each with its math.
 *
 * Built by rgemma/kernels.py with the machine's C compiler (-O3 -march=native
 * -fopenmp) and called through ctypes. Activations stay float32; the weights
 * are read once, in their own type, and widened in registers (both widenings
 * are exact):
 *
 *   int8:  y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]
 *   bf16:  y[m, n] =            sum_k x[m, k] * w[n, k]
 *
 * (the references: rgemma.quantize.dequantize_int8, or w.float(), followed by
 * a float32 matmul). Every product and sum is float32, so the only difference
 * from the reference is the order of the float32 additions.
 *
 * A decode step is bound by reading the weights, so the loops are laid out
 * for the memory system: each thread streams a contiguous range of weight
 * rows, NR rows at a time (one block of NR * K bytes), and prefetches the
 * next block while it multiplies this one. Up to MR activation rows share
 * each weight vector once it is widened; a single activation row takes NR_ONE
 * weight rows a block, enough independent sums to hide the multiply-add's
 * latency. With 16 vector registers (AVX2),
 * products of MANY rows or more take tiles of MR_MANY activation rows by
 * NR_MANY weight rows instead: there, widening the weights costs as much as
 * the multiply-adds, and taller tiles widen each weight fewer times.
 *
 * The vector code is written with GCC vector extensions (one source for
 * AVX-512, AVX2 and NEON); the int8 -> float widening and the int4 byte dot
 * products use x86 intrinsics (GCC derives neither from vector extensions),
 * with plain C loops elsewhere.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16           /* float lanes per vector */
#define MR 4            /* activation rows per tile (4 x NR accumulators: 16 registers) */
#define MR_MANY 4
#define NR_MANY 4
#else
#define VL 8
#define MR 2
#define MR_MANY 4       /* 4 x 2 accumulators, 2 weight vectors, x: 11 of 16 registers */
#define NR_MANY 2
#endif
#define NR 4            /* weight rows per tile */
#define NR_ONE 8        /* weight rows per tile of a single activation row: 8 independent
                           sums (one would wait on the multiply-add's latency of ~4 cycles) */
#define NR_MAX 8        /* the largest of NR, NR_ONE and NR_MANY (accumulator arrays) */
#define MANY 4          /* activation rows from which the int8 and bf16 products use MR_MANY x NR_MANY tiles */
#define MR_MAX 4        /* the largest of MR and MR_MANY (accumulator arrays) */

typedef float vfloat __attribute__((vector_size(VL * 4)));
typedef int8_t vint8 __attribute__((vector_size(VL)));

enum kind { INT8, BF16, FLOAT32 };  /* a weight's type; a constant wherever a tile is inlined */

/* VL int8 weights -> VL floats */
static inline vfloat widen_int8(const int8_t *p)
{
#if defined(__AVX512F__)
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vint8 b;
    memcpy(&b, p, VL);
    return __builtin_convertvector(b, vfloat);
#endif
}

/* VL bf16 weights -> VL floats: a bf16 is the top 16 bits of a float32 */
static inline vfloat widen_bf16(const uint16_t *p)
{
#if defined(__AVX512F__)
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
#elif defined(__AVX2__)
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (vfloat)_mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
#else
    uint32_t u[VL];
    vfloat v;
    for (int i = 0; i < VL; i++)
        u[i] = (uint32_t)p[i] << 16;
    memcpy(&v, u, sizeof v);
    return v;
#endif
}

static inline float bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vfloat load_floats(const float *p)
{
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* VL values of p from index i, as floats */
static inline vfloat widen(enum kind kind, const void *p, int64_t i)
{
    return kind == INT8 ? widen_int8((const int8_t *)p + i)
           : kind == BF16 ? widen_bf16((const uint16_t *)p + i)
                          : load_floats((const float *)p + i);
}

/* value i of p, as a float */
static inline float value_at(enum kind kind, const void *p, int64_t i)
{
    return kind == INT8 ? (float)((const int8_t *)p)[i]
           : kind == BF16 ? bf16_to_float(((const uint16_t *)p)[i])
                          : ((const float *)p)[i];
}

static inline float sum_lanes(vfloat v)
{
    float s = 0.0f;
    for (int i = 0; i < VL; i++)
        s += v[i];
    return s;
}

/* ------------------------------------------------------------------ tiles */

/* acc[i][j] += x[m0 + i, k .. k + VL] * w[n0 + j, k .. k + VL]: each weight vector
 * widened once, used by every row, then dropped (few registers live). */
static inline __attribute__((always_inline)) void step(
    enum kind kind, int mr, int nr, const float *x, int64_t K, const void *w,
    vfloat acc[MR_MAX][NR_MAX], int64_t m0, int64_t n0, int64_t k)
{
    vfloat xv[MR_MAX];
    for (int i = 0; i < mr; i++)
        xv[i] = load_floats(x + (m0 + i) * K + k);
    for (int j = 0; j < nr; j++) {
        vfloat wv = widen(kind, w, (n0 + j) * K + k);
        for (int i = 0; i < mr; i++)
            acc[i][j] += xv[i] * wv;
    }
}

/* y[m0 + i, n0 + j] for i < mr, j < nr: one tile, all of K (scale: int8 only).
 * Inlined with constant kind, mr, nr, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(
    enum kind kind, int mr, int nr, const float *x, int64_t K, const void *w,
    const float *scale, float *y, int64_t N, int64_t m0, int64_t n0)
{
    const char *bytes = w;
    const int64_t size = kind == INT8 ? 1 : 2;  /* bytes per weight */
    vfloat acc[MR_MAX][NR_MAX];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = (vfloat){0};
    const int64_t line = 64 / size;                 /* weights per cache line */
    int64_t k = 0;
    for (; k + line <= K; k += line) {
        for (int64_t v = k; v < k + line; v += VL) {
            /* the next block, while this one is used: int8 once a line (a step is
             * VL bytes, and a prefetch a step would crowd the loads), bf16 each step */
            if (m0 == 0 && (kind != INT8 || v == k))
                for (int j = 0; j < nr; j++)
                    __builtin_prefetch(bytes + ((n0 + j + nr) * K + v) * size, 0, 3);
            step(kind, mr, nr, x, K, w, acc, m0, n0, v);
        }
    }
    for (; k + VL <= K; k += VL)
        step(kind, mr, nr, x, K, w, acc, m0, n0, k);
    for (int i = 0; i < mr; i++) {
        for (int j = 0; j < nr; j++) {
            float s = sum_lanes(acc[i][j]);
            for (int64_t t = k; t < K; t++)                 /* K not a multiple of VL */
                s += x[(m0 + i) * K + t] * value_at(kind, w, (n0 + j) * K + t);
            y[(m0 + i) * N + n0 + j] = kind == INT8 ? s * scale[n0 + j] : s;
        }
    }
}

/* All activation rows, mt at a time (mt <= MR_MAX), against weight rows n0 .. n0 + nr. */
static inline __attribute__((always_inline)) void rows(
    enum kind kind, int mt, int nr, const float *x, int64_t M, int64_t K, const void *w,
    const float *scale, float *y, int64_t N, int64_t n0)
{
    for (int64_t m0 = 0; m0 < M; m0 += mt) {
        int64_t mr = M - m0 < mt ? M - m0 : mt;
        if (mr == mt)
            tile(kind, mt, nr, x, K, w, scale, y, N, m0, n0);
        else if (mr == 1)
            tile(kind, 1, nr, x, K, w, scale, y, N, m0, n0);
        else if (mr == 2)
            tile(kind, 2, nr, x, K, w, scale, y, N, m0, n0);
        else
            tile(kind, 3, nr, x, K, w, scale, y, N, m0, n0);
    }
}

/* y [M, N] = x [M, K] @ w [N, K]^T (times scale [N] for int8), MT x NT tiles: threads
 * split the blocks of NT weight rows; the rows past the last whole block, one at a time.
 * A macro, not a function, so that the tile shape is a constant inside the
 * parallel loop's body (which OpenMP moves into a function of its own). */
#define PRODUCT(KIND, MT, NT, W, SCALE)                                              \
    do {                                                                             \
        int64_t full = N / (NT);                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")            \
        for (int64_t b = 0; b < full; b++)                                           \
            rows(KIND, MT, NT, x, M, K, W, SCALE, y, N, b * (NT));                   \
        for (int64_t n = full * (NT); n < N; n++)                                    \
            rows(KIND, MT, 1, x, M, K, W, SCALE, y, N, n);                           \
    } while (0)

/* y [M, N] = (x [M, K] @ q [N, K]^T) * scale [N]; all row-major, contiguous. */
void rgemma_int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                        const float *scale, float *y, int threads)
{
    if (M >= MANY)
        PRODUCT(INT8, MR_MANY, NR_MANY, q, scale);
    else if (M == 1)
        PRODUCT(INT8, 1, NR_ONE, q, scale);
    else
        PRODUCT(INT8, MR, NR, q, scale);
}

/* y [M, N] = x [M, K] @ w [N, K]^T with w bfloat16 (as uint16); all row-major, contiguous. */
void rgemma_bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                        float *y, int threads)
{
    if (M >= MANY)
        PRODUCT(BF16, MR_MANY, NR_MANY, w, NULL);
    else
        PRODUCT(BF16, MR, NR, w, NULL);
}

/* ------------------------------------------------- the recurrent block's step
 *
 * One decode step of a recurrent block between its three products, fused:
 * from ux = linear_x(x) and uy = linear_y(x) [B, L] to the input of
 * linear_out, z [B, L], updating the conv tail and h in place. Per row b and
 * channel l (head hd = l / bw, i over the head's bw channels), in the order of
 * the reference (rgemma.layers: Conv1D.step, RGLRU.step, RecurrentBlock.step):
 *
 *   ext    = [reset ? 0 : tail[b], ux[b]]                      (K inputs)
 *   c      = sum_k ext[k, l] * cw[l, k] + cb[l]                (conv)
 *   gx     = sigmoid(bx[hd, j] + sum_i c[hd*bw + i] * wx[hd, i, j])
 *   ga     = sigmoid(ba[hd, j] + sum_i c[hd*bw + i] * wa[hd, i, j])
 *   log_a  = -8 * ga * softplus(rp[l])
 *   a      = reset ? 0 : exp(log_a)
 *   mult   = reset ? 1 : sqrt(1 - exp(2 log_a))
 *   h'     = a * h + c * gx * mult;  h = real ? h' : h;  tail = real ? ext[1:] : tail
 *   z      = h' * gelu_tanh(uy)
 *
 * Parameters are FLOAT32 or BF16 (param_kind), the tail FLOAT32 or BF16
 * (tail_kind; stored rounded to nearest even, as a tensor copy rounds), the
 * rest float32. Heads are independent (the gates are block-diagonal), so
 * threads split the heads.
 */
#include <math.h>
#include <stdlib.h>

#if VL == 16             /* gate output vectors a tile of one row holds (32 registers) */
#define WIDE 8
#else
#define WIDE 4
#endif
#define CT WIDE         /* the most gate output vectors of any tile */

static inline uint16_t float_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)          /* NaN stays NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);              /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* p[i] = v, in p's kind (BF16 or FLOAT32) */
static inline void store_at(enum kind kind, void *p, int64_t i, float v)
{
    if (kind == BF16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline float gelu_tanhf(float x)
{
    const float k = 0.7978845608028654f;          /* sqrt(2 / pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

/* conv for channels [l0, l1) of every row into c [B, L]; then the tails */
static void conv_channels(int64_t B, int64_t L, int K, const float *ux, const void *cw,
                          const void *cb, int param_kind, void *tail, int tail_kind,
                          const uint8_t *reset, const uint8_t *real, float *c,
                          int64_t l0, int64_t l1)
{
    for (int64_t b = 0; b < B; b++) {
        void *tb = (char *)tail + b * (K - 1) * L * (tail_kind == BF16 ? 2 : 4);
        for (int64_t l = l0; l < l1; l++) {
            float s = 0.0f;
            for (int k = 0; k < K - 1; k++) {
                float t = reset[b] ? 0.0f : value_at(tail_kind, tb, k * L + l);
                s += t * value_at(param_kind, cw, l * K + k);
            }
            s += ux[b * L + l] * value_at(param_kind, cw, l * K + K - 1);
            c[b * L + l] = s + value_at(param_kind, cb, l);
        }
        if (!real[b])
            continue;
        for (int k = 0; k < K - 1; k++)                /* tail = ext[1:] */
            for (int64_t l = l0; l < l1; l++) {
                float v = k + 1 == K - 1 ? ux[b * L + l]
                          : reset[b]     ? 0.0f
                                         : value_at(tail_kind, tb, (k + 1) * L + l);
                store_at(tail_kind, tb, k * L + l, v);
            }
    }
}

/* the recurrence for row b, channel l, from the two gate pre-activations */
static inline void lru_update(int64_t b, int64_t l, int64_t L, float gx_pre, float ga_pre,
                              const float *c, const float *uy, const float *softplus_rp,
                              const uint8_t *reset, const uint8_t *real, float *h, float *z)
{
    float gx = sigmoidf(gx_pre), ga = sigmoidf(ga_pre);
    float log_a = -8.0f * ga * softplus_rp[l];
    float a = reset[b] ? 0.0f : expf(log_a);
    float mult = reset[b] ? 1.0f : sqrtf(1.0f - expf(2.0f * log_a));
    float h_new = c[b * L + l] * gx * mult + a * h[b * L + l];
    if (real[b])
        h[b * L + l] = h_new;
    z[b * L + l] = h_new * gelu_tanhf(uy[b * L + l]);
}

/* lru_update for VL channels l .. l + VL of row b at once. The exponential is
 * computed here (libm's has no vector form in C): exp(x) = 2^n * exp(r), n =
 * round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact to float32),
 * |r| <= ln 2 / 2, exp(r) by its Taylor series to r^7 / 7! (the next term is
 * below 6e-9 relative: under a float32 rounding); x is clamped to [-87, 88],
 * where 2^n is a normal float (exp(-87) ~ 1.6e-38 stands for anything
 * smaller). sigmoid(x) = 1 / (1 + exp(-x)); gelu_tanh(x) = x * sigmoid(2 k (x +
 * 0.044715 x^3)), the same function as 0.5 x (1 + tanh(k (...))). */
typedef int32_t vint32 __attribute__((vector_size(VL * 4)));

static inline vfloat splat(float v) { return v - (vfloat){0}; }

static inline vfloat select_lanes(vint32 mask, vfloat a, vfloat b)   /* mask ? a : b */
{
    return (vfloat)(((vint32)a & mask) | ((vint32)b & ~mask));
}

static inline vfloat exp_lanes(vfloat x)
{
    x = select_lanes(x < splat(-87.0f), splat(-87.0f), x);
    x = select_lanes(x > splat(88.0f), splat(88.0f), x);
    const vfloat round_magic = splat(12582912.0f);          /* 1.5 * 2^23 */
    vfloat n = (x * splat(1.44269504088896341f) + round_magic) - round_magic;
    vfloat r = (x - n * splat(0.693145751953125f)) - n * splat(1.428606765330187e-06f);
    vfloat e = splat(1.0f / 5040.0f);
    e = e * r + splat(1.0f / 720.0f);
    e = e * r + splat(1.0f / 120.0f);
    e = e * r + splat(1.0f / 24.0f);
    e = e * r + splat(1.0f / 6.0f);
    e = e * r + splat(0.5f);
    e = e * r + splat(1.0f);
    e = e * r + splat(1.0f);
    vint32 two_n = (__builtin_convertvector(n, vint32) + 127) << 23;
    return e * (vfloat)two_n;
}

static inline vfloat sigmoid_lanes(vfloat x) { return splat(1.0f) / (splat(1.0f) + exp_lanes(-x)); }

static inline vfloat sqrt_lanes(vfloat x)
{
#if defined(__AVX512F__)
    return (vfloat)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX__)
    return (vfloat)_mm256_sqrt_ps((__m256)x);
#else
    for (int i = 0; i < VL; i++)
        x[i] = sqrtf(x[i]);
    return x;
#endif
}

static inline void lru_update_lanes(int64_t b, int64_t l, int64_t L, vfloat gx_pre,
                                    vfloat ga_pre, const float *c, const float *uy,
                                    const float *softplus_rp, const uint8_t *reset,
                                    const uint8_t *real, float *h, float *z)
{
    const float k = 0.7978845608028654f;               /* sqrt(2 / pi) */
    vfloat gx = sigmoid_lanes(gx_pre), ga = sigmoid_lanes(ga_pre);
    vfloat log_a = splat(-8.0f) * ga * load_floats(softplus_rp + l);
    vfloat a = splat(0.0f), mult = splat(1.0f);
    if (!reset[b]) {
        a = exp_lanes(log_a);
        mult = sqrt_lanes(splat(1.0f) - exp_lanes(splat(2.0f) * log_a));
    }
    vfloat h_new = load_floats(c + b * L + l) * gx * mult + a * load_floats(h + b * L + l);
    if (real[b])
        memcpy(h + b * L + l, &h_new, sizeof h_new);
    vfloat u = load_floats(uy + b * L + l);
    vfloat gelu = u * sigmoid_lanes(splat(2.0f * k) * (u + splat(0.044715f) * u * u * u));
    vfloat out = h_new * gelu;
    memcpy(z + b * L + l, &out, sizeof out);
}

/* gate tile: rows m0 .. m0 + mr, vectors j0 .. j0 + ct of head hd's outputs */
static inline __attribute__((always_inline)) void gate_tile(
    int mr, int ct, int64_t m0, int64_t hd, int64_t j0, int64_t bw, int64_t L,
    const float *c, const void *wx, const void *bx, const void *wa, const void *ba,
    int param_kind, const float *uy, const float *softplus_rp,
    const uint8_t *reset, const uint8_t *real, float *h, float *z)
{
    vfloat ax[MR][CT], aa[MR][CT];
    for (int j = 0; j < ct; j++) {
        vfloat bxv = widen(param_kind, bx, hd * bw + j0 + j * VL);
        vfloat bav = widen(param_kind, ba, hd * bw + j0 + j * VL);
        for (int m = 0; m < mr; m++)
            ax[m][j] = bxv, aa[m][j] = bav;
    }
    const int64_t base = hd * bw * bw + j0;
    for (int64_t i = 0; i < bw; i++) {
        vfloat wxv[CT], wav[CT];
        for (int j = 0; j < ct; j++) {
            wxv[j] = widen(param_kind, wx, base + i * bw + j * VL);
            wav[j] = widen(param_kind, wa, base + i * bw + j * VL);
        }
        for (int m = 0; m < mr; m++) {
            float ci = c[(m0 + m) * L + hd * bw + i];
            for (int j = 0; j < ct; j++) {
                ax[m][j] += ci * wxv[j];
                aa[m][j] += ci * wav[j];
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < ct; j++)
            lru_update_lanes(m0 + m, hd * bw + j0 + j * VL, L, ax[m][j], aa[m][j], c, uy,
                             softplus_rp, reset, real, h, z);
}

/* one gate output column j of head hd, row b, without vectors (bw not a multiple of VL) */
static void gate_column(int64_t b, int64_t hd, int64_t j, int64_t bw, int64_t L, const float *c,
                        const void *wx, const void *bx, const void *wa, const void *ba,
                        int param_kind, const float *uy, const float *softplus_rp,
                        const uint8_t *reset, const uint8_t *real, float *h, float *z)
{
    float sx = value_at(param_kind, bx, hd * bw + j), sa = value_at(param_kind, ba, hd * bw + j);
    for (int64_t i = 0; i < bw; i++) {
        float ci = c[b * L + hd * bw + i];
        sx += ci * value_at(param_kind, wx, (hd * bw + i) * bw + j);
        sa += ci * value_at(param_kind, wa, (hd * bw + i) * bw + j);
    }
    lru_update(b, hd * bw + j, L, sx, sa, c, uy, softplus_rp, reset, real, h, z);
}

/* rows m0 .. m0 + mr, every gate column of head hd: the widest tiles the
 * registers hold (mr * ct accumulators per gate; one row reads WIDE vectors of
 * each weight row, contiguous), then single vectors, then single columns.
 * kind: param_kind, a constant where this is inlined. */
static inline __attribute__((always_inline)) void gate_rows(
    enum kind kind, int mr, int64_t m0, int64_t hd, int64_t bw, int64_t L, const float *c,
    const void *wx, const void *bx, const void *wa, const void *ba, const float *uy,
    const float *softplus_rp, const uint8_t *reset, const uint8_t *real, float *h, float *z)
{
#define GATE_TILE(R, C, M0) gate_tile(R, C, M0, hd, v * VL, bw, L, c, wx, bx, wa, ba, kind, \
                                      uy, softplus_rp, reset, real, h, z)
    const int64_t full = bw / VL;
    int64_t v = 0;
    switch (mr) {
    case 1: for (; v + WIDE <= full; v += WIDE) GATE_TILE(1, WIDE, m0); break;
#if MR >= 4
    case 2: for (; v + WIDE / 2 <= full; v += WIDE / 2) GATE_TILE(2, WIDE / 2, m0); break;
    case 3: for (; v + 2 <= full; v += 2) GATE_TILE(3, 2, m0); break;
#endif
    default: for (; v + 2 <= full; v += 2) GATE_TILE(MR, 2, m0); break;
    }
    for (; v < full; v++)
        for (int m = 0; m < mr; m++)
            GATE_TILE(1, 1, m0 + m);
#undef GATE_TILE
    for (int64_t j = full * VL; j < bw; j++)
        for (int m = 0; m < mr; m++)
            gate_column(m0 + m, hd, j, bw, L, c, wx, bx, wa, ba, kind, uy, softplus_rp, reset,
                        real, h, z);
}

/* every row and gate column of head hd */
static void gate_head(enum kind kind, int64_t B, int64_t hd, int64_t bw, int64_t L,
                      const float *c, const void *wx, const void *bx, const void *wa,
                      const void *ba, const float *uy, const float *softplus_rp,
                      const uint8_t *reset, const uint8_t *real, float *h, float *z)
{
#define GATE_ROWS(KIND, R) gate_rows(KIND, R, m0, hd, bw, L, c, wx, bx, wa, ba, uy, \
                                     softplus_rp, reset, real, h, z)
#if MR >= 4
#define GATE_ROWS_2_3(KIND) case 2: GATE_ROWS(KIND, 2); break; case 3: GATE_ROWS(KIND, 3); break;
#else
#define GATE_ROWS_2_3(KIND)
#endif
#define GATE_ROWS_OF(KIND)                          \
    switch (B - m0 < MR ? B - m0 : MR) {            \
    case 1: GATE_ROWS(KIND, 1); break;              \
    GATE_ROWS_2_3(KIND)                             \
    default: GATE_ROWS(KIND, MR); break;            \
    }
    for (int64_t m0 = 0; m0 < B; m0 += MR) {
        if (kind == BF16) {
            GATE_ROWS_OF(BF16)
        } else {
            GATE_ROWS_OF(FLOAT32)
        }
    }
#undef GATE_ROWS_OF
#undef GATE_ROWS_2_3
#undef GATE_ROWS
}

/* ux, uy, z [B, L]; tail [B, K-1, L]; h [B, L]; cw [L, K]; cb, rp [L];
 * wx, wa [H, bw, bw]; bx, ba [H, bw]; reset, real [B] (0 / 1). */
void rgemma_recurrent_step(int64_t B, int64_t L, int64_t H, int K, const float *ux,
                           const float *uy, const void *cw, const void *cb, const void *wx,
                           const void *bx, const void *wa, const void *ba, const void *rp,
                           int param_kind, void *tail, int tail_kind, float *h,
                           const uint8_t *reset, const uint8_t *real, float *z, int threads)
{
    const int64_t bw = L / H;
    float *c = malloc(sizeof(float) * B * L);
    float *softplus_rp = malloc(sizeof(float) * L);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t hd = 0; hd < H; hd++) {
        const int64_t l0 = hd * bw, l1 = l0 + bw;
        for (int64_t l = l0; l < l1; l++)
            softplus_rp[l] = softplusf(value_at(param_kind, rp, l));
        conv_channels(B, L, K, ux, cw, cb, param_kind, tail, tail_kind, reset, real, c, l0, l1);
        gate_head(param_kind, B, hd, bw, L, c, wx, bx, wa, ba, uy, softplus_rp, reset, real, h, z);
    }
    free(c);
    free(softplus_rp);
}

/* ------------------------------------------------------- int4 weights (W4A8)
 *
 *   y[m, n] = sum_g ( scale[n, g] * sx[m, g] * sum_{k in g} xq[m, k] * q[n, k]
 *                     + minimum[n, g] * sum_{k in g} x[m, k] )
 *
 * The weights are int4 groups of G columns, W = q * scale + minimum with q in
 * 0..15, two per byte (even column in the low nibble: rgemma.quantize's
 * pack_nibbles). The activations are quantized per row and group to int8,
 * sx = max |x| / 127, xq = round(x / sx) (half to even), so the inner sums are
 * exact int32 products of bytes: AVX-512 VNNI or AVX-VNNI (vpdpbusd), else
 * AVX2's vpmaddubsw (no saturation: 15 * 127 * 2 < 2^15). The minimum's term
 * uses the float32 sums of x. The only error beyond float32 rounding is that of
 * xq, |dx| <= sx / 2 per element (the reference: rgemma.kernels.
 * int4_matmul_reference).
 */
#if defined(__AVX2__)
#define CHUNK 32        /* weight bytes (64 weights) per vector step */

/* CHUNK packed bytes -> their even-column and odd-column nibbles, one per byte */
static inline void unpack_chunk(const uint8_t *w, __m256i *even, __m256i *odd)
{
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i packed = _mm256_loadu_si256((const __m256i *)w);
    *even = _mm256_and_si256(packed, low);
    *odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
}

/* acc (8 x int32) += the byte products of the nibbles with xe (even) and xo (odd) */
static inline __m256i dot_chunk(__m256i acc, __m256i even, __m256i odd, const int8_t *xe,
                                const int8_t *xo)
{
    __m256i a = _mm256_loadu_si256((const __m256i *)xe), b = _mm256_loadu_si256((const __m256i *)xo);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, even, a), odd, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, even, a), odd, b);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(even, a), _mm256_maddubs_epi16(odd, b));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
#endif
}

static inline float sum_lanes8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512VNNI__)
/* int4_tile's sums for groups of whole 64-byte chunks and at most 2 activation
 * rows, a chunk per 512-bit step: the even-column nibbles are the low bits
 * (p & 0x0f), the odd ones are taken in place, times 16 (p & 0xf0), into their
 * own accumulators, whose lanes are sums of multiples of 16 and so divide by 16
 * exactly (an arithmetic shift): the same integer sums, one shift fewer per
 * chunk. out: the minimum's terms, from int4_tile. */
static inline __attribute__((always_inline)) void int4_tile_wide(
    int nr, int mr, const uint8_t *packed, int64_t n0, int64_t m0, const int8_t *xq,
    const float *sx, const float *scale, int64_t K, int64_t G, float out[NR][MR], float *y,
    int64_t N)
{
    const int64_t ng = K / G, gb = G / 2, rb = K / 2;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 facc[NR][2];
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mr; i++)
            facc[j][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i even_acc[NR][2], odd_acc[NR][2];
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++)
                even_acc[j][i] = odd_acc[j][i] = _mm512_setzero_si512();
        for (int64_t c = 0; c < gb; c += 64)
            for (int j = 0; j < nr; j++) {
                const uint8_t *w = packed + (n0 + j) * rb + g * gb + c;
                if (m0 == 0)                      /* the next block, while this one is used */
                    __builtin_prefetch(w + NR * rb, 0, 3);
                __m512i p = _mm512_loadu_si512(w);
                __m512i even = _mm512_and_si512(p, low), odd16 = _mm512_andnot_si512(low, p);
                for (int i = 0; i < mr; i++) {
                    const int8_t *xe = xq + (m0 + i) * K + g * G + c;
                    even_acc[j][i] = _mm512_dpbusd_epi32(even_acc[j][i], even, _mm512_loadu_si512(xe));
                    odd_acc[j][i] = _mm512_dpbusd_epi32(odd_acc[j][i], odd16, _mm512_loadu_si512(xe + gb));
                }
            }
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++) {
                __m512i sum = _mm512_add_epi32(even_acc[j][i], _mm512_srai_epi32(odd_acc[j][i], 4));
                __m512 s = _mm512_set1_ps(scale[(n0 + j) * ng + g] * sx[(m0 + i) * ng + g]);
                facc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, facc[j][i]);
            }
    }
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mr; i++)
            y[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(facc[j][i]) + out[j][i];
}
#endif

/* weight rows n0 .. n0 + nr against activation rows m0 .. m0 + mr, summed over the
 * groups: each chunk of weights unpacked once for all mr rows, nr * mr independent
 * accumulators (vpdpbusd's latency is several cycles); vectorized where a group's
 * bytes are whole chunks. xq, sx, xsum: quantize_groups' output. */
static inline __attribute__((always_inline)) void int4_tile(
    int nr, int mr, const uint8_t *packed, int64_t n0, int64_t m0, const int8_t *xq,
    const float *sx, const float *xsum, const float *scale, const float *minimum, int64_t K,
    int64_t G, float *y, int64_t N)
{
    const int64_t ng = K / G, gb = G / 2, rb = K / 2;
    float out[NR][MR] = {{0}};
    for (int64_t g = 0; g < ng; g++)
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++)
                out[j][i] += minimum[(n0 + j) * ng + g] * xsum[(m0 + i) * ng + g];
#if defined(__AVX512VNNI__)
    if (gb % 64 == 0 && mr <= 2) {
        int4_tile_wide(nr, mr, packed, n0, m0, xq, sx, scale, K, G, out, y, N);
        return;
    }
#endif
#if defined(__AVX2__)
    if (gb % CHUNK == 0) {
        __m256 facc[NR][MR];
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++)
                facc[j][i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256i acc[NR][MR];
            for (int j = 0; j < nr; j++)
                for (int i = 0; i < mr; i++)
                    acc[j][i] = _mm256_setzero_si256();
            for (int64_t c = 0; c < gb; c += CHUNK)
                for (int j = 0; j < nr; j++) {
                    const uint8_t *w = packed + (n0 + j) * rb + g * gb + c;
                    if (m0 == 0)                  /* the next block, while this one is used */
                        __builtin_prefetch(w + NR * rb, 0, 3);
                    __m256i even, odd;
                    unpack_chunk(w, &even, &odd);
                    for (int i = 0; i < mr; i++) {
                        const int8_t *xe = xq + (m0 + i) * K + g * G + c;
                        acc[j][i] = dot_chunk(acc[j][i], even, odd, xe, xe + gb);
                    }
                }
            for (int j = 0; j < nr; j++)
                for (int i = 0; i < mr; i++) {
                    __m256 s = _mm256_set1_ps(scale[(n0 + j) * ng + g] * sx[(m0 + i) * ng + g]);
                    facc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j][i]), s, facc[j][i]);
                }
        }
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < mr; i++)
                y[(m0 + i) * N + n0 + j] = sum_lanes8(facc[j][i]) + out[j][i];
        return;
    }
#endif
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mr; i++) {
            float s = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                const uint8_t *w = packed + (n0 + j) * rb + g * gb;
                const int8_t *xe = xq + (m0 + i) * K + g * G, *xo = xe + gb;
                int32_t acc = 0;
                for (int64_t k = 0; k < gb; k++)
                    acc += (int32_t)(w[k] & 15) * xe[k] + (int32_t)(w[k] >> 4) * xo[k];
                s += (float)acc * (scale[(n0 + j) * ng + g] * sx[(m0 + i) * ng + g]);
            }
            y[(m0 + i) * N + n0 + j] = s + out[j][i];
        }
}

/* all activation rows against weight rows n0 .. n0 + nr */
static inline __attribute__((always_inline)) void int4_rows(
    int nr, const uint8_t *packed, int64_t n0, int64_t M, const int8_t *xq, const float *sx,
    const float *xsum, const float *scale, const float *minimum, int64_t K, int64_t G,
    float *y, int64_t N)
{
#define INT4_TILE(R) int4_tile(nr, R, packed, n0, m0, xq, sx, xsum, scale, minimum, K, G, y, N)
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        switch (M - m0 < MR ? M - m0 : MR) {
        case 1: INT4_TILE(1); break;
#if MR >= 4
        case 2: INT4_TILE(2); break;
        case 3: INT4_TILE(3); break;
#endif
        default: INT4_TILE(MR); break;
        }
    }
#undef INT4_TILE
}

/* one group of G activations (G % QG == 0) -> xq (even columns then odd
 * columns), its scale and sum, a vector at a time: the division and the
 * rounding are the scalar path's (IEEE division, nearest even), so xq and sx
 * are identical to it; the sum adds in another order. */
#if defined(__AVX512F__)
#define QG 32
static inline void quantize_group_vectors(const float *xg, int64_t G, int8_t *out, float *sx,
                                          float *xsum)
{
    const int64_t gb = G / 2;
    __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < G; k += 16) {
        __m512 v = _mm512_loadu_ps(xg + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
    }
    float m = _mm512_reduce_max_ps(amax);
    float scale = m > 0.0f ? m / 127.0f : 1.0f;
    const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (int64_t k = 0; k < G; k += 32) {
        __m512i a[2];
        for (int h = 0; h < 2; h++) {
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xg + k + 16 * h), s),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            a[h] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
        }
        _mm_storeu_si128((__m128i *)(out + k / 2),
                         _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a[0], evens, a[1])));
        _mm_storeu_si128((__m128i *)(out + gb + k / 2),
                         _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a[0], odds, a[1])));
    }
    *sx = scale;
    *xsum = _mm512_reduce_add_ps(sum);
}
#elif defined(__AVX2__)
#define QG 16

/* 8 int32 lanes, each in -127..127 -> their low bytes, in order, at p */
static inline void store_low_bytes(int8_t *p, __m256i v)
{
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1);  /* a lane's four low bytes to its first dword */
    v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
    _mm_storel_epi64((__m128i *)p, _mm256_castsi256_si128(v));
}

static inline void quantize_group_vectors(const float *xg, int64_t G, int8_t *out, float *sx,
                                          float *xsum)
{
    const int64_t gb = G / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int64_t k = 0; k < G; k += 8) {
        __m256 v = _mm256_loadu_ps(xg + k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        sum = _mm256_add_ps(sum, v);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    float scale = m > 0.0f ? m / 127.0f : 1.0f;
    const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  /* evens | odds */
    for (int64_t k = 0; k < G; k += 16) {
        __m256i a[2];
        for (int h = 0; h < 2; h++) {
            __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + k + 8 * h), s),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            a[h] = _mm256_permutevar8x32_epi32(
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)), split);
        }
        store_low_bytes(out + k / 2, _mm256_permute2x128_si256(a[0], a[1], 0x20));
        store_low_bytes(out + gb + k / 2, _mm256_permute2x128_si256(a[0], a[1], 0x31));
    }
    *sx = scale;
    *xsum = sum_lanes8(sum);
}
#endif

/* x [M, K] float32 -> per row and group: xq (even columns then odd columns), sx, xsum */
static void quantize_groups(const float *x, int64_t M, int64_t K, int64_t G, int8_t *xq,
                            float *sx, float *xsum)
{
    const int64_t ng = K / G, gb = G / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + m * K + g * G;
            int8_t *out = xq + m * K + g * G;
#if defined(QG)
            if (G % QG == 0) {
                quantize_group_vectors(xg, G, out, sx + m * ng + g, xsum + m * ng + g);
                continue;
            }
#endif
            float amax = 0.0f, sum = 0.0f;
            for (int64_t k = 0; k < G; k++) {
                amax = fmaxf(amax, fabsf(xg[k]));
                sum += xg[k];
            }
            float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
            for (int64_t k = 0; k < G; k++) {
                float r = nearbyintf(xg[k] / scale);
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                out[(k & 1) * gb + k / 2] = (int8_t)r;
            }
            sx[m * ng + g] = scale;
            xsum[m * ng + g] = sum;
        }
}

/* y [M, N] = x [M, K] @ W.T, W [N, K] int4 groups: packed [N, K/2], scale, minimum [N, K/G] */
void rgemma_int4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t N,
                        const float *scale, const float *minimum, int64_t G, float *y, int threads)
{
    const int64_t ng = K / G;
    int8_t *xq = malloc(M * K);
    float *sx = malloc(sizeof(float) * M * ng), *xsum = malloc(sizeof(float) * M * ng);
    quantize_groups(x, M, K, G, xq, sx, xsum);
    const int64_t full = N / NR;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < full; b++)
        int4_rows(NR, packed, b * NR, M, xq, sx, xsum, scale, minimum, K, G, y, N);
    for (int64_t n = full * NR; n < N; n++)               /* N not a multiple of NR */
        int4_rows(1, packed, n, M, xq, sx, xsum, scale, minimum, K, G, y, N);
    free(xq);
    free(sx);
    free(xsum);
}

/* ------------------------------------------------------------------ RMSNorm
 *
 *   y[m] = x[m] * rsqrt(mean_d x[m, d]^2 + eps) * (1 + w)      (rgemma.layers.RMSNorm)
 *
 * for the few rows of a decode step, in one thread; w FLOAT32 or BF16.
 */
void rgemma_rms_norm(const float *x, int64_t M, int64_t D, const void *w, int kind, float eps,
                     float *y)
{
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * D;
        vfloat acc = {0};
        int64_t d = 0;
        for (; d + VL <= D; d += VL) {
            vfloat v = load_floats(xm + d);
            acc += v * v;
        }
        float sum = sum_lanes(acc);
        for (; d < D; d++)
            sum += xm[d] * xm[d];
        float r = 1.0f / sqrtf(sum / (float)D + eps);
        for (d = 0; d < D; d++)
            y[m * D + d] = xm[d] * r * (value_at(kind, w, d) + 1.0f);
    }
}

/* ------------------------------------------------------- local attention's step
 *
 * One query token per row against the first R ring slots and itself, as
 * rgemma.attention.LocalAttentionBlock.step computes it:
 *
 *   q, k   = rope(q, pos), rope(k, pos)      (first half of each head rotated,
 *            split-half pairs, f_j = base^(-2j / (Dh/2)))
 *   logit  = q . key / sqrt(Dh)  for each ring slot r and for k itself; a slot
 *            is visible when its index i >= 0, i >= doc and stream - i <= W
 *   out    = softmax(logits) . [ring values, v]
 *   ring[num_tokens % W] = (k, v)   for real rows
 *
 * q [B, H, Dh], k, v [B, Dh], out [B, H, Dh] float32; the ring k/v [B, W, Dh]
 * FLOAT32 or BF16 (ring_kind); ring_index [B, R] stream index per slot (-1 empty).
 */
#define MASKED (-2.3819763e38f)  /* the official code's "minus infinity" */

/* cos and sin of pos * f_j, j < Dh / 4, into cs[0 .. half) and cs[half .. 2 half) */
static void rope_angles(float *cs, int64_t Dh, float pos, float base)
{
    const int64_t rot = Dh / 2, half = rot / 2;
    for (int64_t j = 0; j < half; j++) {
        float angle = pos * (1.0f / powf(base, (float)(2 * j) / (float)rot));
        cs[j] = cosf(angle);
        cs[half + j] = sinf(angle);
    }
}

static void rope(float *x, int64_t Dh, const float *cs)
{
    const int64_t half = Dh / 4;
    for (int64_t j = 0; j < half; j++) {
        float r1 = x[j], r2 = x[half + j], c = cs[j], s = cs[half + j];
        x[j] = r1 * c - r2 * s;
        x[half + j] = r2 * c + r1 * s;
    }
}

static inline float dot_ring(const float *q, const void *ring, int kind, int64_t off, int64_t Dh)
{
    vfloat acc = {0};
    int64_t d = 0;
    for (; d + VL <= Dh; d += VL)
        acc += load_floats(q + d) * widen(kind, ring, off + d);
    float s = sum_lanes(acc);
    for (; d < Dh; d++)
        s += q[d] * value_at(kind, ring, off + d);
    return s;
}

void rgemma_attention_step(int64_t B, int64_t H, int64_t Dh, int64_t W, int64_t R,
                           const float *q_in, const float *k_in, const float *v,
                           const int64_t *pos, float base, void *ring_k, void *ring_v,
                           int ring_kind, const int64_t *ring_index, const int64_t *stream,
                           const int64_t *doc, const uint8_t *real, float *out, int threads)
{
    const int64_t half = Dh / 4;
    float *q = malloc(sizeof(float) * B * H * Dh), *k = malloc(sizeof(float) * B * Dh);
    float *cs = malloc(sizeof(float) * B * 2 * (half > 0 ? half : 1));
    memcpy(q, q_in, sizeof(float) * B * H * Dh);
    memcpy(k, k_in, sizeof(float) * B * Dh);
    for (int64_t b = 0; b < B; b++) {
        rope_angles(cs + b * 2 * half, Dh, (float)pos[b], base);
        rope(k + b * Dh, Dh, cs + b * 2 * half);
    }
    const float scale = 1.0f / sqrtf((float)Dh);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H;
        float *qh = q + bh * Dh, *o = out + bh * Dh;
        rope(qh, Dh, cs + b * 2 * half);
        float *logits = malloc(sizeof(float) * (R + 1));
        float top = MASKED;
        for (int64_t r = 0; r < R; r++) {
            int64_t i = ring_index[b * R + r];
            int visible = i >= 0 && i >= doc[b] && stream[b] - i <= W;
            logits[r] = visible ? dot_ring(qh, ring_k, ring_kind, (b * W + r) * Dh, Dh) * scale
                                : MASKED;
            top = logits[r] > top ? logits[r] : top;
        }
        float self = 0.0f;
        for (int64_t d = 0; d < Dh; d++)
            self += qh[d] * k[b * Dh + d];
        logits[R] = self * scale;
        top = logits[R] > top ? logits[R] : top;
        float total = 0.0f;   /* exp(MASKED - top) is 0: masked slots skip expf */
        for (int64_t r = 0; r <= R; r++)
            total += logits[r] = logits[r] > MASKED ? expf(logits[r] - top) : 0.0f;
        for (int64_t d = 0; d < Dh; d++)
            o[d] = logits[R] / total * v[b * Dh + d];
        for (int64_t r = 0; r < R; r++) {
            float p = logits[r] / total;
            if (p == 0.0f)
                continue;
            for (int64_t d = 0; d < Dh; d++)
                o[d] += p * value_at(ring_kind, ring_v, (b * W + r) * Dh + d);
        }
        free(logits);
    }
    for (int64_t b = 0; b < B; b++) {   /* after every head has read the ring */
        if (!real[b])
            continue;
        int64_t slot = stream[b] % W;
        for (int64_t d = 0; d < Dh; d++) {
            store_at(ring_kind, ring_k, (b * W + slot) * Dh + d, k[b * Dh + d]);
            store_at(ring_kind, ring_v, (b * W + slot) * Dh + d, v[b * Dh + d]);
        }
    }
    free(cs);
    free(q);
    free(k);
}

/* ------------------------------------------------------------------ W8A8 around _int_mm
 *
 * The passes before and after PyTorch's int8 x int8 -> int32 product (many rows:
 * prefill, batches), each one pass over memory where PyTorch's ops make five:
 *
 *   quantize:   sx[m] = max(max_k |x[m, k]|, 1e-12) / 127,
 *               xq[m, k] = clamp(round_half_even(x[m, k] / sx[m]), -127, 127)
 *   dequantize: y[m, n] = (float(acc[m, n]) * sx[m]) * scale[n]
 *
 * (rgemma.quantize.quantize_rows_int8 and w8a8_linear's scaling: the same float32
 * operations in the same order, so the results are equal, not close).
 */
void rgemma_quantize_rows_int8(const float *x, int64_t M, int64_t K, int8_t *xq, float *sx,
                               int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float amax = 1e-12f;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(row[k]);
            amax = a > amax ? a : amax;
        }
        const float s = amax / 127.0f;
        int8_t *out = xq + m * K;
        for (int64_t k = 0; k < K; k++) {
            float r = nearbyintf(row[k] / s);
            r = r > 127.0f ? 127.0f : r;
            r = r < -127.0f ? -127.0f : r;
            out[k] = (int8_t)r;
        }
        sx[m] = s;
    }
}

void rgemma_dequantize_rows(const int32_t *acc, int64_t M, int64_t N, const float *sx,
                            const float *scale, float *y, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m++) {
        const int32_t *a = acc + m * N;
        float *out = y + m * N;
        const float s = sx[m];
        for (int64_t n = 0; n < N; n++)
            out[n] = ((float)a[n] * s) * scale[n];
    }
}

/* ------------------------------------------------------------------ int4 weights in bf16
 *
 *   w[n, k] = bf16(bf16(q[n, k] * bf16(scale[n, g])) + bf16(minimum[n, g])),  g = k / G
 *
 * in one pass, for a product of many rows in bf16: PyTorch's bf16 arithmetic
 * rounds after each operation, so this equals rgemma.quantize.dequantize_int4 in
 * bfloat16 (the reference), where its ops make four passes over [N, K].
 * packed [N, K/2]: column 2j in byte j's low nibble, 2j + 1 in its high one.
 */
void rgemma_dequantize_int4_bf16(const uint8_t *packed, int64_t N, int64_t K, const float *scale,
                                 const float *minimum, int64_t G, uint16_t *w, int threads)
{
    const int64_t ng = K / G;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < ng; g++) {
            const float s = bf16_to_float(float_to_bf16(scale[n * ng + g]));
            const float m = bf16_to_float(float_to_bf16(minimum[n * ng + g]));
            const uint8_t *p = packed + n * (K / 2) + g * (G / 2);
            uint16_t *out = w + n * K + g * G;
            for (int64_t j = 0; j < G / 2; j++) {
                float lo = bf16_to_float(float_to_bf16((float)(p[j] & 0xF) * s));
                float hi = bf16_to_float(float_to_bf16((float)(p[j] >> 4) * s));
                out[2 * j] = float_to_bf16(lo + m);
                out[2 * j + 1] = float_to_bf16(hi + m);
            }
        }
}
