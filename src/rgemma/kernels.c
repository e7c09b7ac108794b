/* The products of a decode step (few rows) with weights stored narrower than the
 * float32 activations, on the CPU: int8 (weight-only quantized) and bfloat16.
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
 * each weight vector once it is widened.
 *
 * The vector code is written with GCC vector extensions (one source for
 * AVX-512, AVX2 and NEON); only the int8 -> float widening uses x86
 * intrinsics, which GCC does not derive from __builtin_convertvector.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16           /* float lanes per vector */
#define MR 4            /* activation rows per tile (4 x NR accumulators: 16 registers) */
#else
#define VL 8
#define MR 2
#endif
#define NR 4            /* weight rows per tile */

typedef float vfloat __attribute__((vector_size(VL * 4)));
typedef int8_t vint8 __attribute__((vector_size(VL)));

enum kind { INT8, BF16 };  /* the weights' type; a constant wherever a tile is inlined */

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

static inline vfloat widen(enum kind kind, const void *w, int64_t i)
{
    return kind == INT8 ? widen_int8((const int8_t *)w + i) : widen_bf16((const uint16_t *)w + i);
}

static inline float weight_at(enum kind kind, const void *w, int64_t i)
{
    return kind == INT8 ? (float)((const int8_t *)w)[i] : bf16_to_float(((const uint16_t *)w)[i]);
}

static inline vfloat load_floats(const float *p)
{
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum_lanes(vfloat v)
{
    float s = 0.0f;
    for (int i = 0; i < VL; i++)
        s += v[i];
    return s;
}

/* ------------------------------------------------------------------ tiles */

/* y[m0 + i, n0 + j] for i < mr, j < nr: one tile, all of K (scale: int8 only).
 * Inlined with constant kind, mr, nr, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(
    enum kind kind, int mr, int nr, const float *x, int64_t K, const void *w,
    const float *scale, float *y, int64_t N, int64_t m0, int64_t n0)
{
    const char *bytes = w;
    const int64_t size = kind == INT8 ? 1 : 2;  /* bytes per weight */
    vfloat acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            acc[i][j] = (vfloat){0};
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vfloat wv[NR];
        if (m0 == 0)                         /* the next block, while this one is used */
            for (int j = 0; j < nr; j++)
                for (int64_t b = 0; b < VL * size; b += 64)
                    __builtin_prefetch(bytes + ((n0 + j + NR) * K + k) * size + b, 0, 3);
        for (int j = 0; j < nr; j++)
            wv[j] = widen(kind, w, (n0 + j) * K + k);
        for (int i = 0; i < mr; i++) {
            vfloat xv = load_floats(x + (m0 + i) * K + k);
            for (int j = 0; j < nr; j++)
                acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < mr; i++) {
        for (int j = 0; j < nr; j++) {
            float s = sum_lanes(acc[i][j]);
            for (int64_t t = k; t < K; t++)                 /* K not a multiple of VL */
                s += x[(m0 + i) * K + t] * weight_at(kind, w, (n0 + j) * K + t);
            y[(m0 + i) * N + n0 + j] = kind == INT8 ? s * scale[n0 + j] : s;
        }
    }
}

/* All activation rows against weight rows n0 .. n0 + nr. */
static inline __attribute__((always_inline)) void rows(
    enum kind kind, int nr, const float *x, int64_t M, int64_t K, const void *w,
    const float *scale, float *y, int64_t N, int64_t n0)
{
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        int64_t mr = M - m0 < MR ? M - m0 : MR;
        switch (mr) {
        case 1: tile(kind, 1, nr, x, K, w, scale, y, N, m0, n0); break;
#if MR >= 4
        case 2: tile(kind, 2, nr, x, K, w, scale, y, N, m0, n0); break;
        case 3: tile(kind, 3, nr, x, K, w, scale, y, N, m0, n0); break;
#endif
        default: tile(kind, MR, nr, x, K, w, scale, y, N, m0, n0); break;
        }
    }
}

/* y [M, N] = (x [M, K] @ q [N, K]^T) * scale [N]; all row-major, contiguous. */
void rgemma_int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                        const float *scale, float *y, int threads)
{
    int64_t full = N / NR;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < full; b++)
        rows(INT8, NR, x, M, K, q, scale, y, N, b * NR);
    for (int64_t n = full * NR; n < N; n++)               /* N not a multiple of NR */
        rows(INT8, 1, x, M, K, q, scale, y, N, n);
}

/* y [M, N] = x [M, K] @ w [N, K]^T with w bfloat16 (as uint16); all row-major, contiguous. */
void rgemma_bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                        float *y, int threads)
{
    int64_t full = N / NR;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < full; b++)
        rows(BF16, NR, x, M, K, w, NULL, y, N, b * NR);
    for (int64_t n = full * NR; n < N; n++)
        rows(BF16, 1, x, M, K, w, NULL, y, N, n);
}
