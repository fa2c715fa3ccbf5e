/* A CPU decode step's matmuls over row tiles (model/cpu_kernels.py's layout), its groups and its attention, in
   AVX-512 or AVX2 (model/cpu_simd.py compiles this file with the host's compiler, -O3 -march=native -fopenmp
   -ffp-contract=off, and loads it with ctypes; a host with neither fails the #error below and keeps the matrices
   dequantized, or inductor's kernels where asked).

   Tiles, TILE = 64 output rows side by side, row 16k + w of a tile in byte k of int32 word w:
     4-bit  q int32 (NT, G, H, 16), H = gs / 2: word j of group g holds value g*gs + j in its low nibble and
            g*gs + H + j in its high one; s, o (NT, G, 64): value = q * s + o.
     8-bit  q int8 (NT, G, gs, 64): byte r of value j of group g is row r's (inductor's kernels read 8-bit tiles in
            words as the 4-bit ones, model/cpu_kernels.py); s (NT, G, 64) and, where the format has one,
            o (NT, G, 64): value = q * s (+ o).
   s and o are fp16 or float32 (the *32 flags). Each group's sum of q * x is taken first and scaled once:
   y = sum_g (acc_g * s_g + o_g * sum_g(x)), x times the dequantized matrix in another order of float32 roundings
   (tests/test_cpu_kernels.py: within 1e-5 of the reference's largest |y|).

   A vector holds V = 16 lanes (AVX-512) or 8 (AVX2): a tile's 64 rows are NV = 64 / V vectors, vector u = rows
   [u V, u V + V) = byte k = u / NW of the NW = 16 / V word vectors' half u % NW. The 4-bit values become floats by
   a lookup on AVX-512 (vpermps of the word shifted right: the instruction reads only the low 4 bits of each index),
   by a mask alone on AVX2 (SUBNORMAL below); the 8-bit ones by a sign-extending load and a conversion; every value then
   costs one FMA against x's value broadcast. The loads run PF groups ahead of a software prefetch. Threads: OpenMP over
   tiles, in the libgomp that torch loaded (the same SONAME: one pool of threads), nth of them as the caller's
   torch.get_num_threads(). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64
#define MAXM 4
#define PF 2

#if defined(__AVX512F__)
#define V 16
typedef __m512 vf;
typedef __m512i vi;
#define VZERO() _mm512_setzero_ps()
#define VSET1(a) _mm512_set1_ps(a)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VILOAD(p) _mm512_loadu_si512(p)
#define VSUM(a) _mm512_reduce_add_ps(a)
#define VHALF(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#define VU8(p) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#define VI8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#define VNEG(a) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000)))
#define NIBBLE_LUT const vf lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define VNIB(w, sh) _mm512_permutexvar_ps(_mm512_srli_epi32(w, sh), lut)
#define SUBNORMAL 0
#define VNIBS VNIB
/* 2^n a: scalef; 0 where x was below the range */
#define VPOW2(a, n) _mm512_scalef_ps(a, n)
#define VROUND(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VZERO_BELOW(y, x, lo) _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y)
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define V 8
typedef __m256 vf;
typedef __m256i vi;
#define VZERO() _mm256_setzero_ps()
#define VSET1(a) _mm256_set1_ps(a)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VILOAD(p) _mm256_loadu_si256((const __m256i*)(p))
static inline float VSUM(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define VHALF(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define VU8(p) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#define VI8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p))))
#define VNEG(a) _mm256_xor_ps(a, _mm256_set1_ps(-0.0f))
#define NIBBLE_LUT const vi lut = _mm256_set1_epi32(15)
#define VNIB(w, sh) _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, sh), lut))
/* The tile kernels' nibbles without the conversion: the masked bits q read as the subnormal float q 2^-149, times x
   scaled by 2^64 (exact: the product is x q 2^-85, a normal float for |x q| >= 2^-41), the group's sum scaled back by
   2^85 with its scale. 30% more values a second on a first-generation Zen (benchmarks: docs/BENCHMARKS.md). Where
   this thread's MXCSR has DAZ set (a library built with -ffast-math sets it for the process) subnormal operands read
   as zero: there the values are converted as before and the scale takes 2^-64 instead. */
#define SUBNORMAL 1
#define VNIBS(w, sh) (daz ? VNIB(w, sh) : _mm256_castsi256_ps(_mm256_and_si256(_mm256_srli_epi32(w, sh), lut)))
#define VPOW2(a, n) _mm256_mul_ps(a, _mm256_castsi256_ps(_mm256_slli_epi32(                                    \
    _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))
#define VROUND(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VZERO_BELOW(y, x, lo) _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y)
#else
#error "model/cpu_simd.c needs AVX-512F, or AVX2 with FMA and F16C"
#endif
#define NV (TILE / V)
#define NW (16 / V)

/* A tiled matrix: its planes and their types (F16, F32, U8, I8). A K-quant's s and o are its sub-blocks' 6-bit
   scales and minimums (U8; q6_k's scales I8), ksub sub-blocks a super-block, whose d and dm (F16, (NT, G / ksub,
   64)) they multiply: s = d * sc, o = -(dm * m), as model/quant.py's dequantizers round them. */
enum { F16, F32, U8, I8 };
typedef struct {
    const void* q; /* 4-bit: int32 words; 8-bit: int8 bytes (NT, G, gs, 64), rows in order */
    const void *s, *o, *d, *dm; /* o NULL: none (8-bit only); d, dm: a K-quant's (ksub > 0) */
    int st, ot, nt, groups, gs, nibble, ksub;
} tiles_t;

static inline vf plane(const void* p, size_t i, int type) {
    switch (type) {
    case F32: return VLOAD((const float*)p + i);
    case U8: return VU8((const uint8_t*)p + i);
    case I8: return VI8((const int8_t*)p + i);
    default: return VHALF((const uint16_t*)p + i);
    }
}

/* Vector u of tile t's group g: its scales and offsets (0 where the format has none). */
static inline void scale_offset(const tiles_t* w, int t, int g, int u, vf* S, vf* O) {
    size_t i = ((size_t)t * w->groups + g) * TILE + V * u;
    *S = plane(w->s, i, w->st);
    *O = w->o ? plane(w->o, i, w->ot) : VZERO();
    if (w->ksub) {
        size_t j = ((size_t)t * (w->groups / w->ksub) + g / w->ksub) * TILE + V * u;
        *S = VMUL(VHALF((const uint16_t*)w->d + j), *S);
        if (w->o) *O = VMUL(VNEG(VHALF((const uint16_t*)w->dm + j)), *O);
    }
}

/* A group's sums of q * x (acc) scaled into the outputs y: y + acc * s (+ o * the group's sum of x, *sxg, where
   the format has offsets). */
static inline vf group_out(vf y, vf acc, vf S, vf O, const float* sxg) {
    y = VFMA(acc, S, y);
    return sxg ? VFMA(O, VSET1(*sxg), y) : y;
}

/* One tile's 64 outputs for M rows of x (x row stride K), into y (row stride ldy) at column t * 64. On AVX-512 the
   low and the high nibbles' sums are two sets of accumulators (8 chains of FMAs for one row); on AVX2 one set (8
   already, and 16 registers). */
#if V == 16
#define HI Hi
#else
#define HI L
#endif
#define NIBBLE_TILE(M)                                                                                            \
static void nibble_tile_##M(const float* x, const float* sx, const tiles_t* w, int t, float* y, int ldy) {      \
    NIBBLE_LUT;                                                                                                   \
    const int daz = SUBNORMAL && (_mm_getcsr() & 0x0040);                                                         \
    const int G = w->groups, gs = w->gs, K = G * gs;                                                              \
    const int32_t* q = (const int32_t*)w->q;                                                                      \
    const int H = gs / 2;                                                                                         \
    vf Y[M][NV];                                                                                                  \
    for (int r = 0; r < M; r++)                                                                                   \
        for (int u = 0; u < NV; u++) Y[r][u] = VZERO();                                                           \
    for (int g = 0; g < G; g++) {                                                                                 \
        const int32_t* qg = q + ((size_t)t * G + g) * H * 16;                                                     \
        for (int l = 0; l < H * 64; l += 64) _mm_prefetch((const char*)(qg + PF * H * 16) + l, _MM_HINT_T0);      \
        vf L[M][NV], Hi[M][NV];                                                                                   \
        for (int r = 0; r < M; r++)                                                                               \
            for (int u = 0; u < NV; u++) L[r][u] = Hi[r][u] = VZERO();                                            \
        for (int j = 0; j < H; j++) {                                                                             \
            vi wv[NW];                                                                                            \
            for (int c = 0; c < NW; c++) wv[c] = VILOAD(qg + 16 * j + V * c);                                     \
            for (int u = 0; u < NV; u++) {                                                                        \
                vf lo = VNIBS(wv[u % NW], 8 * (u / NW)), hi = VNIBS(wv[u % NW], 8 * (u / NW) + 4);                \
                for (int r = 0; r < M; r++) {                                                                     \
                    const float* xr = x + (size_t)r * K + (size_t)g * gs;                                         \
                    L[r][u] = VFMA(lo, VSET1(xr[j]), L[r][u]);                                                    \
                    HI[r][u] = VFMA(hi, VSET1(xr[H + j]), HI[r][u]);                                              \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int u = 0; u < NV; u++) {                                                                            \
            vf S, O;                                                                                              \
            scale_offset(w, t, g, u, &S, &O);                                                                     \
            if (SUBNORMAL) S = VMUL(S, VSET1(daz ? 0x1p-64f : 0x1p85f));                                          \
            for (int r = 0; r < M; r++)                                                                           \
                Y[r][u] = group_out(Y[r][u], V == 16 ? VADD(L[r][u], Hi[r][u]) : L[r][u], S, O, sx + r * G + g);  \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++)                                                                                   \
        for (int u = 0; u < NV; u++) VSTORE(y + (size_t)r * ldy + (size_t)t * TILE + V * u, Y[r][u]);             \
}

#define BYTE_TILE(M)                                                                                              \
static void byte_tile_##M(const float* x, const float* sx, const tiles_t* w, int t, float* y, int ldy) {        \
    const int G = w->groups, gs = w->gs, K = G * gs;                                                              \
    const int8_t* q = (const int8_t*)w->q;                                                                        \
    vf Y[M][NV];                                                                                                  \
    for (int r = 0; r < M; r++)                                                                                   \
        for (int u = 0; u < NV; u++) Y[r][u] = VZERO();                                                           \
    for (int g = 0; g < G; g++) {                                                                                 \
        const int8_t* qg = q + ((size_t)t * G + g) * gs * TILE;                                                   \
        for (int l = 0; l < gs * TILE; l += 64) _mm_prefetch((const char*)(qg + PF * gs * TILE + l), _MM_HINT_T0); \
        vf A[M][NV], B[M][NV];                                                                                    \
        for (int r = 0; r < M; r++)                                                                               \
            for (int u = 0; u < NV; u++) A[r][u] = B[r][u] = VZERO();                                             \
        for (int j = 0; j < gs; j += 2) {                                                                         \
            for (int u = 0; u < NV; u++) {                                                                        \
                vf v0 = VI8(qg + j * TILE + V * u), v1 = VI8(qg + (j + 1) * TILE + V * u);                        \
                for (int r = 0; r < M; r++) {                                                                     \
                    const float* xr = x + (size_t)r * K + (size_t)g * gs;                                         \
                    A[r][u] = VFMA(v0, VSET1(xr[j]), A[r][u]);                                                    \
                    B[r][u] = VFMA(v1, VSET1(xr[j + 1]), B[r][u]);                                                \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int u = 0; u < NV; u++) {                                                                            \
            vf S, O;                                                                                              \
            scale_offset(w, t, g, u, &S, &O);                                                                     \
            for (int r = 0; r < M; r++)                                                                           \
                Y[r][u] = group_out(Y[r][u], VADD(A[r][u], B[r][u]), S, O, w->o ? sx + r * G + g : NULL);         \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++)                                                                                   \
        for (int u = 0; u < NV; u++) VSTORE(y + (size_t)r * ldy + (size_t)t * TILE + V * u, Y[r][u]);             \
}

NIBBLE_TILE(1) NIBBLE_TILE(2) NIBBLE_TILE(3) NIBBLE_TILE(4)
BYTE_TILE(1) BYTE_TILE(2) BYTE_TILE(3) BYTE_TILE(4)


/* y (m, ldy) = x (m, K) times the tiled matrix (all nt * 64 rows, padding included); m in 1..MAXM. */
static void mv(const tiles_t* w, int m, const float* x, float* y, int ldy, int nth) {
    const int K = w->groups * w->gs, G = w->groups;
    float sx[MAXM * 1024];
    float* sums = G * m <= MAXM * 1024 ? sx : malloc(sizeof(float) * G * m);
    if (w->o)
        for (int r = 0; r < m; r++)
            for (int g = 0; g < G; g++) {
                float a = 0;
                for (int j = 0; j < w->gs; j++) a += x[(size_t)r * K + (size_t)g * w->gs + j];
                sums[r * G + g] = a;
            }
    float* xs = NULL; /* SUBNORMAL: 2^64 x for the nibble tiles */
    if (SUBNORMAL && w->nibble) {
        xs = malloc(sizeof(float) * m * K);
        for (size_t i = 0; i < (size_t)m * K; i++) xs[i] = x[i] * 0x1p64f;
    }
    const float* xn = xs ? xs : x;
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int t = 0; t < w->nt; t++) {
        if (w->nibble) {
            switch (m) {
            case 1: nibble_tile_1(xn, sums, w, t, y, ldy); break;
            case 2: nibble_tile_2(xn, sums, w, t, y, ldy); break;
            case 3: nibble_tile_3(xn, sums, w, t, y, ldy); break;
            default: nibble_tile_4(xn, sums, w, t, y, ldy); break;
            }
        } else {
            switch (m) {
            case 1: byte_tile_1(x, sums, w, t, y, ldy); break;
            case 2: byte_tile_2(x, sums, w, t, y, ldy); break;
            case 3: byte_tile_3(x, sums, w, t, y, ldy); break;
            default: byte_tile_4(x, sums, w, t, y, ldy); break;
            }
        }
    }
    if (sums != sx) free(sums);
    free(xs);
}

void llms_mv(const tiles_t* w, int m, const float* x, float* y, int ldy, int nth) { mv(w, m, x, y, ldy, nth); }

/* model.transformer.rms_norm in float32: (x * rsqrt(mean(x^2) + eps)) * w, each product rounded. */
static void rms(int m, int dim, const float* x, const float* w, float eps, float* out) {
    for (int r = 0; r < m; r++) {
        const float* xr = x + (size_t)r * dim;
        float ss = 0;
        for (int i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) {
            float v = xr[i] * inv;
            out[(size_t)r * dim + i] = v * w[i];
        }
    }
}

/* (re, im) pairs of n features rotated by cos, sin of their pair index modulo half (model.transformer.Rope.apply). */
static void rotate(float* v, int n, int half, const float* cos, const float* sin) {
    for (int i = 0; i < n / 2; i++) {
        float re = v[2 * i], im = v[2 * i + 1], c = cos[i % half], s = sin[i % half];
        float a = re * c, b = im * s, e = re * s, f = im * c;
        v[2 * i] = a - b;
        v[2 * i + 1] = e + f;
    }
}

/* A decode step's attention input: the q, k and v matrices (nw = 1: one fused q|k|v matrix; 3: each its own, of
   any formats) times RMSNorm(h), q's nq and k's nk features rotated (head_dim hd: pairs of each head at cos, sin
   [0, hd / 2)), into q (m, nq), k (m, nk), v (m, nv). */
void llms_attention_in(const tiles_t* const* ws, int nw, int m, int dim, const float* h, const float* norm,
                       float eps, int nq, int nk, int nv, int hd, const float* cos, const float* sin, float* q,
                       float* k, float* v, int nth) {
    int ldy = 0, col[3];
    for (int i = 0; i < nw; i++) {
        col[i] = ldy;
        ldy += ws[i]->nt * TILE;
    }
    const int qo = 0, ko = nw == 1 ? nq : col[1], vo = nw == 1 ? nq + nk : col[2];
    float* xn = malloc(sizeof(float) * m * (dim + ldy));
    float* y = xn + (size_t)m * dim;
    rms(m, dim, h, norm, eps, xn);
    for (int i = 0; i < nw; i++) mv(ws[i], m, xn, y + col[i], ldy, nth);
    for (int r = 0; r < m; r++) {
        float* yr = y + (size_t)r * ldy;
        rotate(yr + qo, nq, hd / 2, cos, sin);
        rotate(yr + ko, nk, hd / 2, cos, sin);
        memcpy(q + (size_t)r * nq, yr + qo, sizeof(float) * nq);
        memcpy(k + (size_t)r * nk, yr + ko, sizeof(float) * nk);
        memcpy(v + (size_t)r * nv, yr + vo, sizeof(float) * nv);
    }
    free(xn);
}

/* out (m, n) = h + the tiled matrix times a (m, K). */
void llms_residual(const tiles_t* w, int m, int n, const float* h, const float* a, float* out, int nth) {
    int ldy = w->nt * TILE;
    float* y = malloc(sizeof(float) * m * ldy);
    mv(w, m, a, y, ldy, nth);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < n; i++) out[(size_t)r * n + i] = h[(size_t)r * n + i] + y[(size_t)r * ldy + i];
    free(y);
}

/* A decode step's FFN group: out (m, dim) = h + W2 (silu(W1 x) * W3 x), x = RMSNorm(h), W1|W3 one tiled matrix
   (W1's hidden rows first). silu(g) = g / (1 + exp(-g)). */
void llms_ffn(const tiles_t* w13, const tiles_t* w2, int m, int dim, int hidden, const float* h, const float* norm,
              float eps, float* out, int nth) {
    int ld13 = w13->nt * TILE;
    float* xn = malloc(sizeof(float) * m * (dim + ld13 + hidden));
    float *gu = xn + (size_t)m * dim, *act = gu + (size_t)m * ld13;
    rms(m, dim, h, norm, eps, xn);
    mv(w13, m, xn, gu, ld13, nth);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < hidden; i++) {
            float g = gu[(size_t)r * ld13 + i], u = gu[(size_t)r * ld13 + hidden + i];
            float sg = g / (1.0f + expf(-g));
            act[(size_t)r * hidden + i] = sg * u;
        }
    llms_residual(w2, m, dim, h, act, out, nth);
    free(xn);
}

/* Tiles [t0, t1) dequantized into out (t1 - t0, K, 64) float32, lane l of tile t = row 64 t + l: q * s + o, or q * s
   where there is no o, each product and sum rounded as model/quant.py's dequantizers round them (no FMA here). */
void llms_dequant(const tiles_t* w, int t0, int t1, float* out, int nth) {
    const int G = w->groups, gs = w->gs, K = G * gs;
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int t = t0; t < t1; t++) {
        NIBBLE_LUT;
        float* ot = out + (size_t)(t - t0) * K * TILE;
        for (int g = 0; g < G; g++) {
            vf S[NV], O[NV];
            for (int u = 0; u < NV; u++) scale_offset(w, t, g, u, &S[u], &O[u]);
            if (w->nibble) {
                const int H = gs / 2;
                const int32_t* qg = (const int32_t*)w->q + ((size_t)t * G + g) * H * 16;
                for (int j = 0; j < H; j++) {
                    vi v[NW];
                    for (int c = 0; c < NW; c++) v[c] = VILOAD(qg + 16 * j + V * c);
                    float *lo = ot + (size_t)(g * gs + j) * TILE, *hi = ot + (size_t)(g * gs + H + j) * TILE;
                    for (int u = 0; u < NV; u++) {
                        vf a = VNIB(v[u % NW], 8 * (u / NW)), b = VNIB(v[u % NW], 8 * (u / NW) + 4);
                        VSTORE(lo + V * u, VADD(VMUL(a, S[u]), O[u]));
                        VSTORE(hi + V * u, VADD(VMUL(b, S[u]), O[u]));
                    }
                }
            } else {
                const int8_t* qg = (const int8_t*)w->q + ((size_t)t * G + g) * gs * TILE;
                for (int j = 0; j < gs; j++) {
                    float* oj = ot + (size_t)(g * gs + j) * TILE;
                    for (int u = 0; u < NV; u++) {
                        vf a = VMUL(VI8(qg + j * TILE + V * u), S[u]);
                        VSTORE(oj + V * u, w->o ? VADD(a, O[u]) : a);
                    }
                }
            }
        }
    }
}

/* exp(x) for a vector, x <= 88.37 (a softmax's x - max <= 0): 2^n e^r, n = round(x log2 e), r = x - n ln 2 in two
   parts, e^r by Cephes' polynomial for expf (relative error about 2e-7); below -87.3 the result is 0. */
static inline vf vexp(vf x) {
    const vf lo = VSET1(-87.3f);
    vf xc = VMAX(x, lo);
    vf n = VROUND(VMUL(xc, VSET1(1.44269504088896341f)));
    vf r = VFNMA(n, VSET1(0.693359375f), xc);
    r = VFNMA(n, VSET1(-2.12194440e-4f), r);
    vf y = VSET1(1.9875691500E-4f);
    y = VFMA(y, r, VSET1(1.3981999507E-3f));
    y = VFMA(y, r, VSET1(8.3334519073E-3f));
    y = VFMA(y, r, VSET1(4.1665795894E-2f));
    y = VFMA(y, r, VSET1(1.6666665459E-1f));
    y = VFMA(y, r, VSET1(5.0000001201E-1f));
    y = VFMA(y, VMUL(r, r), VADD(r, VSET1(1.0f)));
    return VZERO_BELOW(VPOW2(y, n), x, lo);
}

/* A decode step's attention: the new keys and values kn, vn (b, nkv * hd; row strides ldk, ldv) written to slot
   end - 1 of the cache k, v (b, L, nkv, hd; row stride ldkv), then every slot [0, end) seen (no padding) by the
   queries q (b, H * hd; row stride ldq) -> out (b, H * hd). Query head h reads key head h / (H / nkv)
   (grouped-query attention); softmax(q k / sqrt(hd)) v. */
void llms_decode_attention(int b, int H, int nkv, int hd, const float* q, long ldq, const float* kn, long ldk,
                           const float* vn, long ldv, float* k, float* v, long ldkv, int end, float* out, int nth) {
    const int rep = H / nkv, vec = hd % V == 0 && hd <= 256;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int r = 0; r < b; r++)
        for (int i = 0; i < nkv * hd; i++) {
            k[(size_t)r * ldkv + (size_t)(end - 1) * nkv * hd + i] = kn[(size_t)r * ldk + i];
            v[(size_t)r * ldkv + (size_t)(end - 1) * nkv * hd + i] = vn[(size_t)r * ldv + i];
        }
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int bh = 0; bh < b * H; bh++) {
        const int r = bh / H, h = bh % H, kh = h / rep;
        const float* qh = q + (size_t)r * ldq + (size_t)h * hd;
        const float* kb = k + (size_t)r * ldkv + (size_t)kh * hd;
        const float* vb = v + (size_t)r * ldkv + (size_t)kh * hd;
        const size_t step = (size_t)nkv * hd;
        float* p = malloc(sizeof(float) * (end + V));
        float* o = out + (size_t)bh * hd;
        float mx = -INFINITY;
        for (int t = 0; t < end; t++) {
            const float* kt = kb + t * step;
            float d = 0;
            if (vec) {
                vf acc = VZERO();
                for (int i = 0; i < hd; i += V) acc = VFMA(VLOAD(qh + i), VLOAD(kt + i), acc);
                d = VSUM(acc);
            } else {
                for (int i = 0; i < hd; i++) d += qh[i] * kt[i];
            }
            p[t] = d * scale;
            mx = p[t] > mx ? p[t] : mx;
        }
        for (int t = end; t < end + V; t++) p[t] = -INFINITY; /* whole vectors: the tail's exp is 0 */
        vf sv = VZERO();
        for (int t = 0; t < end; t += V) {
            vf e = vexp(VSUB(VLOAD(p + t), VSET1(mx)));
            VSTORE(p + t, e);
            sv = VADD(sv, e);
        }
        const float sum = VSUM(sv);
        if (vec) {
            vf acc[256 / V];
            const int nv = hd / V;
            for (int i = 0; i < nv; i++) acc[i] = VZERO();
            for (int t = 0; t < end; t++) {
                const float* vt = vb + t * step;
                vf pt = VSET1(p[t]);
                for (int i = 0; i < nv; i++) acc[i] = VFMA(pt, VLOAD(vt + V * i), acc[i]);
            }
            vf inv = VSET1(1.0f / sum);
            for (int i = 0; i < nv; i++) VSTORE(o + V * i, VMUL(acc[i], inv));
        } else {
            for (int i = 0; i < hd; i++) o[i] = 0;
            for (int t = 0; t < end; t++) {
                const float* vt = vb + t * step;
                for (int i = 0; i < hd; i++) o[i] += p[t] * vt[i];
            }
            for (int i = 0; i < hd; i++) o[i] /= sum;
        }
        free(p);
    }
}
