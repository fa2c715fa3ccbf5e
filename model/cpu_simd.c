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
#define VU8I(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p)))
#define VI8I(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p)))
#define VANDI(a, b) _mm512_and_si512(a, b)
#define VORI(a, b) _mm512_or_si512(a, b)
#define VSUBI(a, b) _mm512_sub_epi32(a, b)
#define VSRLI(a, n) _mm512_srli_epi32(a, n)
#define VSLLI(a, n) _mm512_slli_epi32(a, n)
#define VSET1I(a) _mm512_set1_epi32(a)
#define VCVT(a) _mm512_cvtepi32_ps(a)
#define VCASTF(a) _mm512_castsi512_ps(a)
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
#define VU8I(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p)))
#define VI8I(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p)))
#define VANDI(a, b) _mm256_and_si256(a, b)
#define VORI(a, b) _mm256_or_si256(a, b)
#define VSUBI(a, b) _mm256_sub_epi32(a, b)
#define VSRLI(a, n) _mm256_srli_epi32(a, n)
#define VSLLI(a, n) _mm256_slli_epi32(a, n)
#define VSET1I(a) _mm256_set1_epi32(a)
#define VCVT(a) _mm256_cvtepi32_ps(a)
#define VCASTF(a) _mm256_castsi256_ps(a)
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
    int blocks, rows; /* blocks > 0: not tiles but the stored bytes read in place (BLOCKS below), rows of them */
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


/* BLOCKS: a matrix read where it lies, in the image's bytes (model/quant.py), rows [0, rows) each its own run of
   bytes: a decode step's matmul with no copy of the weights (the DRAM tier of a split, a ring slot). Each row's
   groups are summed over lanes along K (x's values loaded as vectors), scaled once a group, and the lanes summed
   once a row. 4-bit values are read as subnormal floats times 2^64 x (SUBNORMAL above; where the thread's MXCSR
   has DAZ set they are converted and x is read as it is), the others converted. The products are those of the
   reference dequantizer's values in another order of float32 roundings (tests/test_cpu_kernels.py).
     B_Q8_0  34-byte blocks of 32: d fp16, 32 int8 q; value q d
     B_Q4_K  144-byte super-blocks of 256: d, dmin fp16, 12 bytes of 6-bit scales and minimums, 128 bytes of
             nibbles (chunk c of 64 values: low nibbles values 64c + j, high 64c + 32 + j); value
             (d sc) q - (dmin m) per sub-block of 32
     B_Q6_K  210-byte super-blocks of 256: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d fp16;
             value (d sc) (q - 32) per sub-block of 16
     B_INT8  q int8 (rows, K), then scales fp16 (rows, K / gs); value q s
     B_INT4  q (rows, K / 2) two a byte, the even column low, then scales and minimums fp16 (rows, K / gs);
             value q s + m
     B_Q4_0  18-byte blocks of 32: d fp16, 16 bytes of nibbles (low: values j, high: 16 + j); value d (q - 8)
     B_Q4_1  20-byte blocks of 32: d, m fp16, the nibbles as Q4_0's; value d q + m
   x2 holds x's values as the 4-bit kernels read them: 2^64 x (B_Q4_K, B_Q4_0, B_Q4_1), or the even columns' then the odd
   columns' (B_INT4: 2^64 x, then x for the DAZ path); sx each group's sum of x (the 4-bit ones). */
enum { B_TILES, B_Q8_0, B_Q4_K, B_Q6_K, B_INT8, B_INT4, B_Q4_0, B_Q4_1 };

static inline float half(const void* p) {
    uint16_t h;
    memcpy(&h, p, 2); /* a section may start at an odd byte */
    return _cvtsh_ss(h);
}

/* Q4_K's scale and minimum j of 8 (ggml's get_scale_min_k4). */
static inline void k4_scale_min(int j, const uint8_t* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q6_K: 16 values' q - 32 as int8, from their low nibbles (ql: the low ones for f < 2, else the high ones) and
   their 2-bit pairs f of qh: byte operations on 16 values at once, then widened to V-lane floats (Q6_WIDEN). */
static inline __m128i q6_bytes(const uint8_t* ql, const uint8_t* qh, int f) {
    const __m128i m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
    __m128i l = _mm_loadu_si128((const __m128i*)ql), hq = _mm_loadu_si128((const __m128i*)qh);
    l = _mm_and_si128(f < 2 ? l : _mm_srli_epi16(l, 4), m15);
    hq = _mm_and_si128(_mm_srl_epi16(hq, _mm_cvtsi32_si128(2 * f)), m3);
    return _mm_sub_epi8(_mm_or_si128(l, _mm_slli_epi16(hq, 4)), _mm_set1_epi8(32));
}
#if V == 16
#define Q6_WIDEN(q, w0, w1) const vf w0 = VCVT(_mm512_cvtepi8_epi32(q)), w1 = w0
#else
#define Q6_WIDEN(q, w0, w1) const vf w0 = VCVT(_mm256_cvtepi8_epi32(q)), w1 = VCVT(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))
#endif

#define NIBS(w) (conv ? VCVT(w) : VCASTF(w))
#define BLOCK_ROWS(M, D)                                                                                          \
static void q4k_row_##M##_##D(const uint8_t* b, int K, const float* x, const float* sx, float* y, int ldy) {     \
    const vi m15 = VSET1I(15);                                                                                    \
    const int conv = D; /* DAZ: converted, not read as subnormals */                                              \
    const float f = D ? 1.0f : 0x1p85f;                                                                           \
    vf Y[M];                                                                                                      \
    float mins[M];                                                                                                \
    for (int r = 0; r < M; r++) Y[r] = VZERO(), mins[r] = 0;                                                      \
    for (int i = 0; i < K / 256; i++, b += 144) {                                                                 \
        const float d = half(b) * f, dmin = half(b + 2);                                                          \
        for (int c = 0; c < 4; c++) {                                                                             \
            int sc0, m0, sc1, m1;                                                                                 \
            k4_scale_min(2 * c, b + 4, &sc0, &m0);                                                                \
            k4_scale_min(2 * c + 1, b + 4, &sc1, &m1);                                                            \
            vf L[M], H[M];                                                                                        \
            for (int r = 0; r < M; r++) L[r] = H[r] = VZERO();                                                    \
            for (int k = 0; k < 32; k += V) {                                                                     \
                const vi w = VU8I(b + 16 + 32 * c + k);                                                           \
                const vf lo = NIBS(VANDI(w, m15)), hi = NIBS(VSRLI(w, 4));                                        \
                for (int r = 0; r < M; r++) {                                                                     \
                    const float* xr = x + (size_t)r * K + 256 * i + 64 * c + k;                                   \
                    L[r] = VFMA(lo, VLOAD(xr), L[r]);                                                             \
                    H[r] = VFMA(hi, VLOAD(xr + 32), H[r]);                                                        \
                }                                                                                                 \
            }                                                                                                     \
            const float dm0 = dmin * m0, dm1 = dmin * m1;                                                     \
            for (int r = 0; r < M; r++) {                                                                         \
                Y[r] = VFMA(L[r], VSET1(d * sc0), Y[r]);                                                          \
                Y[r] = VFMA(H[r], VSET1(d * sc1), Y[r]);                                                          \
                const float* s = sx + (size_t)r * (K / 32) + 8 * i + 2 * c;                                       \
                mins[r] += dm0 * s[0] + dm1 * s[1];                                                               \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]) - mins[r];                                        \
}                                                                                                                 \
static void q4_row_##M##_##D(const uint8_t* b, int K, int q41, const float* x, const float* sx, float* y,       \
                             int ldy) {                                                                           \
    const vi m15 = VSET1I(15);                                                                                    \
    const int conv = D;                                                                                           \
    const float f = D ? 1.0f : 0x1p85f;                                                                           \
    const int bb = q41 ? 20 : 18;                                                                                 \
    vf Y[M];                                                                                                      \
    float offs[M];                                                                                                \
    for (int r = 0; r < M; r++) Y[r] = VZERO(), offs[r] = 0;                                                      \
    for (int i = 0; i < K / 32; i++, b += bb) {                                                                   \
        vf A[M];                                                                                                  \
        for (int r = 0; r < M; r++) A[r] = VZERO();                                                               \
        for (int k = 0; k < 16; k += V) {                                                                         \
            const vi w = VU8I(b + bb - 16 + k);                                                                   \
            const vf lo = NIBS(VANDI(w, m15)), hi = NIBS(VSRLI(w, 4));                                            \
            for (int r = 0; r < M; r++) {                                                                         \
                const float* xr = x + (size_t)r * K + 32 * i + k;                                                 \
                A[r] = VFMA(hi, VLOAD(xr + 16), VFMA(lo, VLOAD(xr), A[r]));                                       \
            }                                                                                                     \
        }                                                                                                         \
        const float d = half(b), o = q41 ? half(b + 2) : -8 * d; /* q4_0: d (q - 8) = q d + (-8 d), exact */      \
        for (int r = 0; r < M; r++) {                                                                             \
            Y[r] = VFMA(A[r], VSET1(d * f), Y[r]);                                                                \
            offs[r] += o * sx[(size_t)r * (K / 32) + i];                                                          \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]) + offs[r];                                         \
}                                                                                                                 \
static void int4_row_##M##_##D(const uint8_t* q, const uint16_t* s, const uint16_t* o, int K, int gs,            \
                               const float* x, const float* sx, float* y, int ldy) {                              \
    const vi m15 = VSET1I(15);                                                                                    \
    const int conv = D; /* DAZ: converted, not read as subnormals */                                              \
    const float f = D ? 1.0f : 0x1p85f;                                                                           \
    const int H = K / 2;                                                                                          \
    vf Y[M];                                                                                                      \
    float offs[M];                                                                                                \
    for (int r = 0; r < M; r++) Y[r] = VZERO(), offs[r] = 0;                                                      \
    for (int g = 0; g < K / gs; g++) {                                                                            \
        vf A[M];                                                                                                  \
        for (int r = 0; r < M; r++) A[r] = VZERO();                                                               \
        for (int k = g * gs / 2; k < (g + 1) * gs / 2; k += V) {                                                  \
            const vi w = VU8I(q + k);                                                                             \
            const vf lo = NIBS(VANDI(w, m15)), hi = NIBS(VSRLI(w, 4));                                            \
            for (int r = 0; r < M; r++) {                                                                         \
                const float* xr = x + (size_t)r * K + k; /* the even columns, then the odd ones */               \
                A[r] = VFMA(hi, VLOAD(xr + H), VFMA(lo, VLOAD(xr), A[r]));                                        \
            }                                                                                                     \
        }                                                                                                         \
        const float sg = half(s + g) * f, og = half(o + g);                                                       \
        for (int r = 0; r < M; r++) {                                                                             \
            Y[r] = VFMA(A[r], VSET1(sg), Y[r]);                                                                   \
            offs[r] += og * sx[(size_t)r * (K / gs) + g];                                                         \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]) + offs[r];                                         \
}
#define BYTE_ROWS(M)                                                                                              \
static void q8_0_row_##M(const uint8_t* b, int K, const float* x, float* y, int ldy) {                           \
    vf Y[M];                                                                                                      \
    for (int r = 0; r < M; r++) Y[r] = VZERO();                                                                   \
    for (int i = 0; i < K / 32; i++, b += 34) {                                                                   \
        vf A[M];                                                                                                  \
        for (int r = 0; r < M; r++) A[r] = VZERO();                                                               \
        for (int k = 0; k < 32; k += V) {                                                                         \
            const vf w = VCVT(VI8I(b + 2 + k));                                                                   \
            for (int r = 0; r < M; r++) A[r] = VFMA(w, VLOAD(x + (size_t)r * K + 32 * i + k), A[r]);              \
        }                                                                                                         \
        const vf d = VSET1(half(b));                                                                              \
        for (int r = 0; r < M; r++) Y[r] = VFMA(A[r], d, Y[r]);                                                   \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]);                                                  \
}                                                                                                                 \
static void int8_row_##M(const int8_t* q, const uint16_t* s, int K, int gs, const float* x, float* y, int ldy) { \
    vf Y[M];                                                                                                      \
    for (int r = 0; r < M; r++) Y[r] = VZERO();                                                                   \
    for (int g = 0; g < K / gs; g++) {                                                                            \
        vf A[M];                                                                                                  \
        for (int r = 0; r < M; r++) A[r] = VZERO();                                                               \
        for (int k = g * gs; k < (g + 1) * gs; k += V) {                                                          \
            const vf w = VCVT(VI8I(q + k));                                                                       \
            for (int r = 0; r < M; r++) A[r] = VFMA(w, VLOAD(x + (size_t)r * K + k), A[r]);                       \
        }                                                                                                         \
        const vf sg = VSET1(half(s + g));                                                                         \
        for (int r = 0; r < M; r++) Y[r] = VFMA(A[r], sg, Y[r]);                                                  \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]);                                                  \
}                                                                                                                 \
static void q6k_row_##M(const uint8_t* b, int K, const float* x, float* y, int ldy) {                            \
    vf Y[M];                                                                                                      \
    for (int r = 0; r < M; r++) Y[r] = VZERO();                                                                   \
    for (int i = 0; i < K / 256; i++, b += 210) {                                                                 \
        const float d = half(b + 208);                                                                            \
        for (int sb = 0; sb < 16; sb++) { /* values 128 h + 32 f + [k0, k0 + 16) */                               \
            const int h = sb / 8, f = sb % 8 / 2, k0 = sb % 2 * 16;                                               \
            const __m128i q = q6_bytes(b + 64 * h + 32 * (f % 2) + k0, b + 128 + 32 * h + k0, f);                 \
            const float* xs = x + 256 * i + 128 * h + 32 * f + k0;                                                \
            vf A[M];                                                                                              \
            for (int r = 0; r < M; r++) A[r] = VZERO();                                                           \
            Q6_WIDEN(q, w0, w1);                                                                                  \
            for (int r = 0; r < M; r++) A[r] = VFMA(w0, VLOAD(xs + (size_t)r * K), A[r]);                        \
            if (V == 8)                                                                                           \
                for (int r = 0; r < M; r++) A[r] = VFMA(w1, VLOAD(xs + (size_t)r * K + 8), A[r]);                 \
            const vf sc = VSET1(d * (float)(int8_t)b[192 + sb]);                                                  \
            for (int r = 0; r < M; r++) Y[r] = VFMA(A[r], sc, Y[r]);                                              \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < M; r++) y[(size_t)r * ldy] = VSUM(Y[r]);                                                  \
}

BLOCK_ROWS(1, 0) BLOCK_ROWS(2, 0) BLOCK_ROWS(3, 0) BLOCK_ROWS(4, 0)
BLOCK_ROWS(1, 1) BLOCK_ROWS(2, 1) BLOCK_ROWS(3, 1) BLOCK_ROWS(4, 1)
BYTE_ROWS(1) BYTE_ROWS(2) BYTE_ROWS(3) BYTE_ROWS(4)

#define ROWS_CASES(call, D)                                                                                       \
    switch (m) {                                                                                                  \
    case 1: call(1, D); break;                                                                                    \
    case 2: call(2, D); break;                                                                                    \
    case 3: call(3, D); break;                                                                                    \
    default: call(4, D); break;                                                                               \
    }

/* y (m, ldy) = x (m, K) times the rows of a BLOCKS matrix; m in 1..MAXM. */
static void mv_blocks(const tiles_t* w, int m, const float* x, float* y, int ldy, int nth) {
    const int K = w->groups * w->gs, gs = w->gs, n = w->rows, fmt = w->blocks;
    const int q4 = fmt == B_Q4_0 || fmt == B_Q4_1;
    const int nibble = fmt == B_Q4_K || fmt == B_INT4 || q4, sg = fmt == B_Q4_K || q4 ? 32 : gs, G = K / sg;
    float *x2 = NULL, *sx = NULL;
    if (nibble) { /* [0, mK): the SUBNORMAL path's x, [mK, 2mK): the DAZ path's; B_INT4: even columns first */
        x2 = malloc(sizeof(float) * 2 * m * K);
        sx = malloc(sizeof(float) * m * G);
        for (int r = 0; r < m; r++) {
            const float* xr = x + (size_t)r * K;
            float *a = x2 + (size_t)r * K, *b = x2 + (size_t)(m + r) * K;
            for (int j = 0; j < K; j++) {
                const int to = fmt == B_INT4 ? (j % 2) * (K / 2) + j / 2 : j;
                a[to] = xr[j] * 0x1p64f;
                b[to] = xr[j];
            }
            for (int g = 0; g < G; g++) {
                float t = 0;
                for (int j = 0; j < sg; j++) t += xr[g * sg + j];
                sx[r * G + g] = t;
            }
        }
    }
    const size_t rb = fmt == B_Q8_0 ? (size_t)K / 32 * 34 : fmt == B_Q4_K ? (size_t)K / 256 * 144
                    : fmt == B_Q6_K ? (size_t)K / 256 * 210 : fmt == B_INT8 ? (size_t)K
                    : fmt == B_INT4 ? (size_t)K / 2 : (size_t)K / 32 * (fmt == B_Q4_1 ? 20 : 18);
    const uint8_t* q = (const uint8_t*)w->q;
    const uint16_t *s = (const uint16_t*)w->s, *o = (const uint16_t*)w->o;
#pragma omp parallel for schedule(static) num_threads(nth)
    for (int i = 0; i < n; i++) {
        const int daz = (_mm_getcsr() & 0x0040) != 0;
        const float* xn = nibble && daz ? x2 + (size_t)m * K : x2;
        float* yi = y + i;
        const uint8_t* row = q + rb * i;
#define Q4K(M, D) q4k_row_##M##_##D(row, K, xn, sx, yi, ldy)
#define INT4(M, D) int4_row_##M##_##D(row, s + (size_t)i * G, o + (size_t)i * G, K, gs, xn, sx, yi, ldy)
#define Q8_0(M, D) q8_0_row_##M(row, K, x, yi, ldy)
#define Q6K(M, D) q6k_row_##M(row, K, x, yi, ldy)
#define Q4(M, D) q4_row_##M##_##D(row, K, fmt == B_Q4_1, xn, sx, yi, ldy)
#define INT8(M, D) int8_row_##M((const int8_t*)row, s + (size_t)i * G, K, gs, x, yi, ldy)
        if (fmt == B_Q4_K) {
            if (daz) ROWS_CASES(Q4K, 1) else ROWS_CASES(Q4K, 0)
        } else if (fmt == B_INT4) {
            if (daz) ROWS_CASES(INT4, 1) else ROWS_CASES(INT4, 0)
        } else if (q4) {
            if (daz) ROWS_CASES(Q4, 1) else ROWS_CASES(Q4, 0)
        } else if (fmt == B_Q8_0) ROWS_CASES(Q8_0, 0)
        else if (fmt == B_Q6_K) ROWS_CASES(Q6K, 0)
        else ROWS_CASES(INT8, 0)
    }
    free(x2);
    free(sx);
}

/* y (m, ldy) = x (m, K) times the tiled matrix (all nt * 64 rows, padding included); m in 1..MAXM. */
static void mv(const tiles_t* w, int m, const float* x, float* y, int ldy, int nth) {
    if (w->blocks) {
        mv_blocks(w, m, x, y, ldy, nth);
        return;
    }
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

/* A decode step's FFN group: out (m, dim) = h + W2 (silu(W1 x) * W3 x), x = RMSNorm(h), W1|W3 one matrix (w3
   NULL: W1's hidden rows first) or two. silu(g) = g / (1 + exp(-g)). */
void llms_ffn(const tiles_t* w13, const tiles_t* w3, const tiles_t* w2, int m, int dim, int hidden, const float* h,
              const float* norm, float eps, float* out, int nth) {
    const int off3 = w3 ? w13->nt * TILE : hidden, ld13 = w3 ? off3 + w3->nt * TILE : w13->nt * TILE;
    float* xn = malloc(sizeof(float) * m * (dim + ld13 + hidden));
    float *gu = xn + (size_t)m * dim, *act = gu + (size_t)m * ld13;
    rms(m, dim, h, norm, eps, xn);
    mv(w13, m, xn, gu, ld13, nth);
    if (w3) mv(w3, m, xn, gu + off3, ld13, nth);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < hidden; i++) {
            float g = gu[(size_t)r * ld13 + i], u = gu[(size_t)r * ld13 + off3 + i];
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
