/* CPU kernels for weights in GGML blocks: y = x @ W.T and W -> float32.
 *
 * Weights stay in the exact GGUF byte layout (one row of blocks per output feature), so
 * the kernels stream the file's bytes once per token, which is what decode is bound by.
 *
 * gemv (a few activation rows, i.e. decode): each activation row is first rounded to
 * 8-bit blocks of 32 (scale d = max|x|/127, stored as fp16 as llama.cpp does), then every
 * weight block meets every activation block in an integer dot product: 32 int8 x int8
 * products summed in int32, scaled once by d_w * d_x. Integer multiply-adds move 4x the
 * values per instruction of float FMAs, which is what lets 2 AVX2 cores keep up with
 * memory bandwidth on 4-bit weights. Each activation row's result depends only on that
 * row, so a batch equals each row alone, bit for bit.
 *
 * Paths: AVX2 (+FMA, F16C) chosen at run time; a portable C path for everything else.
 * Threads: OpenMP over output rows, each thread streaming a contiguous slice of W.
 *
 * The module is a plain CPython extension without torch headers, so building it never
 * pulls PyTorch into a build environment; Python passes data pointers of contiguous
 * tensors (falconet/quant/kernels.py checks shapes and dtypes before every call).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define HAVE_X86 0
#endif

/* GGML type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8 };
#define QK 32
#define MAX_ROWS 8 /* activation rows per gemv call; kernels.GEMV_ROWS must not exceed it */

typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_0;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;
_Static_assert(sizeof(block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(block_q4_1) == 20, "q4_1 block");
_Static_assert(sizeof(block_q5_0) == 22, "q5_0 block");
_Static_assert(sizeof(block_q8_0) == 34, "q8_0 block");

/* An activation block: 32 int8 quants, scale d, s = d * sum(qs) for Q4_1's min term
 * (llama.cpp's q8_1 carries the same sum), and for the AVX2 path `offset`, the pairwise
 * sums of o * qs for the weight format's offset o (8 for Q4_0, 16 for Q5_0): subtracting
 * it from the unsigned-weight products gives sum (q - o) * qs exactly, in integers, once
 * per activation block instead of once per weight block. */
typedef struct { float d, s; int32_t isum; int8_t qs[QK]; int16_t offset[QK / 2]; } block_x8;

static float half_table[1 << 16];
static int use_avx2;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> fp16 -> float, round to nearest even (the activation scale's precision). */
static float round_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    if (ax >= 0x477ff000u) return sign ? -INFINITY : INFINITY; /* rounds past 65504 */
    if (ax < 0x38800000u) { /* below 2^-14: fp16 subnormal grid of 2^-24 */
        float a = fabsf(f), r = nearbyintf(a * 16777216.0f) / 16777216.0f;
        return sign ? -r : r;
    }
    uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u); /* keep 10 mantissa bits */
    rounded &= ~0x1fffu;
    rounded |= sign;
    memcpy(&f, &rounded, 4);
    return f;
}

/* ---- activation rounding -------------------------------------------------------- */

static void quantize_x8_ref(const float *x, block_x8 *out, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += QK) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float id = amax ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            out[b].qs[i] = (int8_t)nearbyintf(x[i] * id);
            sum += out[b].qs[i];
        }
        out[b].d = round_to_half(amax / 127.0f);
        out[b].isum = sum;
        out[b].s = out[b].d * (float)sum;
    }
}

/* ---- portable kernels ----------------------------------------------------------- */

/* Weight block b of a row as 32 integer quants and (scale, min). */
static void unpack_block(int type, const uint8_t *row, int64_t b, int8_t q[QK], float *d, float *m) {
    int i;
    *m = 0.0f;
    switch (type) {
    case T_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)row + b;
        for (i = 0; i < QK / 2; i++) { q[i] = (w->qs[i] & 15) - 8; q[i + 16] = (w->qs[i] >> 4) - 8; }
        *d = half_table[w->d];
        break;
    }
    case T_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)row + b;
        for (i = 0; i < QK / 2; i++) { q[i] = w->qs[i] & 15; q[i + 16] = w->qs[i] >> 4; }
        *d = half_table[w->d];
        *m = half_table[w->m];
        break;
    }
    case T_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)row + b;
        uint32_t qh;
        memcpy(&qh, w->qh, 4);
        for (i = 0; i < QK / 2; i++) {
            q[i] = ((w->qs[i] & 15) | ((qh >> i) & 1) << 4) - 16;
            q[i + 16] = ((w->qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4) - 16;
        }
        *d = half_table[w->d];
        break;
    }
    default: { /* T_Q8_0 */
        const block_q8_0 *w = (const block_q8_0 *)row + b;
        memcpy(q, w->qs, QK);
        *d = half_table[w->d];
    }
    }
}

static size_t block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return sizeof(block_q4_0);
    case T_Q4_1: return sizeof(block_q4_1);
    case T_Q5_0: return sizeof(block_q5_0);
    case T_Q8_0: return sizeof(block_q8_0);
    default: return 0;
    }
}

static void gemv_rows_ref(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                          int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    int8_t q[QK];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = W + n * row_bytes;
        float acc[MAX_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            unpack_block(type, row, b, q, &d, &m);
            for (int64_t r = 0; r < M; r++) {
                const block_x8 *xb = xq + r * nb + b;
                int sum = 0;
                for (int i = 0; i < QK; i++) sum += q[i] * xb->qs[i];
                acc[r] += d * xb->d * (float)sum + m * xb->s;
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = acc[r];
    }
}

static void dequant_rows_ref(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                             int64_t nb, float *out) {
    int8_t q[QK];
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * nb * QK;
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            unpack_block(type, W + n * row_bytes, b, q, &d, &m);
            /* adding Q4_1's min only: q*d + 0 would turn GGML's -0.0 into +0.0 */
            for (int i = 0; i < QK; i++) o[b * QK + i] = type == T_Q4_1 ? (float)q[i] * d + m : (float)q[i] * d;
        }
    }
}

/* ---- AVX2 kernels --------------------------------------------------------------- */
#if HAVE_X86

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles are elements 0..15, high ones 16..31. */
AVX2 static inline __attribute__((always_inline)) __m256i nibbles(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* Bit i of 32 bits -> 0x10 in byte i (Q5_0's fifth bit). */
AVX2 static inline __attribute__((always_inline)) __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                             0x0101010101010101, 0x0000000000000000);
    const __m256i select = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* Weight block -> 32 int8 in a register with its scale d (and Q4_1's min m): unsigned
 * quants for the 4/5-bit formats, so their dot products need no sign juggling (the
 * Q4_0/Q5_0 offset comes off in dot_offset); signed quants for Q8_0. */
AVX2 static inline __attribute__((always_inline)) __m256i load_block(int type, const uint8_t *row, int64_t b, float *d, float *m) {
    switch (type) {
    case T_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return nibbles(w->qs); /* unsigned; the offset 8 is block_x8.offset */
    }
    case T_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)row + b;
        *d = _cvtsh_ss(w->d);
        *m = _cvtsh_ss(w->m);
        return nibbles(w->qs);
    }
    case T_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return _mm256_or_si256(nibbles(w->qs), fifth_bits(w->qh)); /* unsigned; offset 16 */
    }
    default: {
        const block_q8_0 *w = (const block_q8_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return _mm256_loadu_si256((const __m256i *)w->qs);
    }
    }
}

/* Sum of 32 products of signed int8, as 8 float partial sums. maddubs takes an unsigned
 * left operand, so the signs move onto the right one (|a| * sign(a)*b). */
AVX2 static inline __attribute__((always_inline)) __m256 dot_signed(__m256i a, __m256i b) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* sum (a - o) * x for unsigned a, from the products a * x less the activation block's
 * precomputed o * x pair sums (zero for Q4_1, whose min is applied in float). */
AVX2 static inline __attribute__((always_inline)) __m256 dot_offset(__m256i a, const block_x8 *x) {
    __m256i p16 = _mm256_maddubs_epi16(a, _mm256_loadu_si256((const __m256i *)x->qs));
    p16 = _mm256_sub_epi16(p16, _mm256_loadu_si256((const __m256i *)x->offset));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

AVX2 static void quantize_x8_avx2(const float *x, block_x8 *out, int64_t nb, int weight_offset) {
    const __m256i vo = _mm256_set1_epi8((char)weight_offset);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < nb; b++, x += QK) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 id = _mm256_set1_ps(amax ? 127.0f / amax : 0.0f);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        /* int32 -> int8, undoing the lane interleave of the packs */
        __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)out[b].qs, p8);
        _mm256_storeu_si256((__m256i *)out[b].offset, _mm256_maddubs_epi16(vo, p8));
        out[b].d = round_to_half(amax / 127.0f);
        out[b].isum = (int32_t)hsum(_mm256_cvtepi32_ps(sum)); /* |sum| <= 4064: exact */
        out[b].s = out[b].d * (float)out[b].isum;
    }
}

/* One weight row against M activation rows. Blocks go in pairs to two accumulators (to
 * hide FMA latency); the arithmetic per activation row does not depend on M, so a batch
 * equals each row alone. Inlined with M = 1 for decode so the accumulators stay in
 * registers. */
AVX2 static inline __attribute__((always_inline)) __m256 dot_block(int type, __m256i w, const block_x8 *x) {
    if (type == T_Q8_0) return dot_signed(w, _mm256_loadu_si256((const __m256i *)x->qs));
    if (type == T_Q4_1) {
        __m256i p16 = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)x->qs));
        return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    }
    return dot_offset(w, x);
}

AVX2 static inline __attribute__((always_inline)) void gemv_row_avx2(
    int type, const uint8_t *row, int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    __m256 a0[MAX_ROWS], a1[MAX_ROWS];
    float macc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) { a0[r] = a1[r] = _mm256_setzero_ps(); macc[r] = 0.0f; }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        float d0, d1, m0 = 0, m1 = 0;
        __m256i w0 = load_block(type, row, b, &d0, &m0);
        __m256i w1 = load_block(type, row, b + 1, &d1, &m1);
        for (int64_t r = 0; r < M; r++) {
            const block_x8 *x0 = xq + r * nb + b, *x1 = x0 + 1;
            a0[r] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x0->d), dot_block(type, w0, x0), a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * x1->d), dot_block(type, w1, x1), a1[r]);
            if (type == T_Q4_1) macc[r] += m0 * x0->s + m1 * x1->s;
        }
    }
    for (; b < nb; b++) {
        float d0, m0 = 0;
        __m256i w0 = load_block(type, row, b, &d0, &m0);
        for (int64_t r = 0; r < M; r++) {
            const block_x8 *x0 = xq + r * nb + b;
            a0[r] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x0->d), dot_block(type, w0, x0), a0[r]);
            if (type == T_Q4_1) macc[r] += m0 * x0->s;
        }
    }
    for (int64_t r = 0; r < M; r++) y[r * N] = hsum(_mm256_add_ps(a0[r], a1[r])) + macc[r];
}

/* Specialised per format and for M = 1: the format switch and the row loop fold away. */
#define GEMV_ROW(T)                                                                       \
    (M == 1 ? gemv_row_avx2(T, W + n * row_bytes, nb, xq, 1, N, y + n)                   \
            : gemv_row_avx2(T, W + n * row_bytes, nb, xq, M, N, y + n))

AVX2 static void gemv_rows_avx2(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                                int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        switch (type) {
        case T_Q4_0: GEMV_ROW(T_Q4_0); break;
        case T_Q4_1: GEMV_ROW(T_Q4_1); break;
        case T_Q5_0: GEMV_ROW(T_Q5_0); break;
        default: GEMV_ROW(T_Q8_0);
        }
    }
}

AVX2 static void dequant_rows_avx2(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                                   int64_t nb, float *out) {
    /* Bit-exact with GGML's dequantize_row: (q - offset)*d with one rounding, and Q4_1's
     * q*d + m with two. */
    const __m256i offset = _mm256_set1_epi32(type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0);
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * nb * QK;
        for (int64_t b = 0; b < nb; b++) {
            float d, m = 0;
            __m256i q = load_block(type, W + n * row_bytes, b, &d, &m);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
            __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; j++) {
                __m256i i32 = type == T_Q8_0 ? _mm256_cvtepi8_epi32(parts[j]) : _mm256_cvtepu8_epi32(parts[j]);
                __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i32, offset)), vd);
                _mm256_storeu_ps(o + b * QK + 8 * j, type == T_Q4_1 ? _mm256_add_ps(v, vm) : v);
            }
        }
    }
}
#endif


/* ---- interleaved rows (x8) --------------------------------------------------------
 *
 * The row-major kernels spend ~14 instructions per weight block: unpacking, a horizontal
 * product, a conversion and a scale for every 32 values. Reordering the bytes of each
 * group of 8 output rows lets one instruction serve all 8 rows instead: per block index
 * b, a tile holds the 8 rows' fp16 scales, then 4-byte pieces of the 8 rows side by
 * side (piece k of row r in 32-bit lane r):
 *
 *   Q4_0 tile (144 B): d[8] | qs[0..3] of rows 0..7 | qs[4..7] ... | qs[12..15] ...
 *   Q4_1 tile (160 B): d[8] | m[8] | then as Q4_0
 *   Q8_0 tile (272 B): d[8] | qs[0..3] of rows 0..7 | ... | qs[28..31] ...
 *
 * Broadcasting 4 activation values to every lane, maddubs + madd give each row's partial
 * sum in its own lane; a block's 8 row sums convert and scale in one vector operation.
 * A group's tiles are contiguous and as long as its 8 GGML rows, so repacking is a
 * permutation within each group (done once, at the first CPU forward). llama.cpp
 * repacks Q4_0 for AVX2 for the same reason; this layout is falconet's own.
 */
#define X8 8

static size_t tile_bytes(int type) { return X8 * block_bytes(type); }

/* GGML rows [N, nb blocks] -> x8 tiles, or back (to_x8 = 0). N % 8 == 0. */
static void repack(int type, const uint8_t *src, uint8_t *dst, int64_t N, int64_t nb, int to_x8) {
    const size_t bb = block_bytes(type), row_bytes = nb * bb;
    const size_t hb = type == T_Q4_1 ? 4 : 2, qb = bb - hb; /* header: d (and m); quants */
    for (int64_t g = 0; g < N / X8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *tile = (uint8_t *)(to_x8 ? dst : src) + g * X8 * row_bytes + b * tile_bytes(type);
            for (int r = 0; r < X8; r++) {
                uint8_t *block = (uint8_t *)(to_x8 ? src : dst) + (g * X8 + r) * row_bytes + b * bb;
                uint8_t *q_block = block + hb;
                for (size_t h = 0; h < hb; h += 2) { /* d into the first 16 bytes, m the next */
                    uint8_t *field = tile + h * X8 + 2 * r;
                    if (to_x8) memcpy(field, block + h, 2); else memcpy(block + h, field, 2);
                }
                for (size_t k = 0; k < qb / 4; k++) {
                    uint8_t *piece = tile + hb * X8 + k * 4 * X8 + 4 * r;
                    if (to_x8) memcpy(piece, q_block + 4 * k, 4); else memcpy(q_block + 4 * k, piece, 4);
                }
            }
        }
    }
}

#if HAVE_X86
AVX2 static inline __attribute__((always_inline)) __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 8 rows' sums of one block against one activation block, lane r = row r. */
/* The unsigned 4-bit products, less Q4_0's offset 8 (offset 0: Q4_1). */
AVX2 static inline __attribute__((always_inline)) __m256i tile_dot_q4(const __m256i w[8], const block_x8 *x,
                                                                    int offset) {
    /* w[k] holds elements 4k..4k+3 (k < 4) or 16+4(k-4).. (k >= 4) of each row, unsigned;
     * 8 pair sums of at most 2*15*127 stay inside int16. */
    __m256i s16 = _mm256_maddubs_epi16(w[0], bcast4(x->qs));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[1], bcast4(x->qs + 4)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[2], bcast4(x->qs + 8)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[3], bcast4(x->qs + 12)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[4], bcast4(x->qs + 16)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[5], bcast4(x->qs + 20)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[6], bcast4(x->qs + 24)));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[7], bcast4(x->qs + 28)));
    __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    return offset ? _mm256_sub_epi32(s32, _mm256_set1_epi32(offset * x->isum)) : s32; /* (q - 8) */
}

AVX2 static inline __attribute__((always_inline)) __m256i tile_dot_q8_0(const __m256i w[8], const __m256i aw[8],
                                                                      const block_x8 *x) {
    /* signed x signed: |w| times x carrying w's sign; pair sums reach 2*127*127, so each
     * piece widens to int32 before the next is added */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s32 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        __m256i p16 = _mm256_maddubs_epi16(aw[k], _mm256_sign_epi8(bcast4(x->qs + 4 * k), w[k]));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p16, ones));
    }
    return s32;
}

AVX2 static inline __attribute__((always_inline)) void gemv_group_x8(
    int type, const uint8_t *tiles, int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    __m256 acc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    const size_t tb = tile_bytes(type), quants = type == T_Q4_1 ? 32 : 16;
    const __m256i mask = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < nb; b++, tiles += tb) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tiles));
        __m256 mw = _mm256_setzero_ps();
        __m256i w[8], aw[8];
        if (type == T_Q4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tiles + 16)));
        if (type != T_Q8_0) {
            for (int k = 0; k < 4; k++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(tiles + quants + 32 * k));
                w[k] = _mm256_and_si256(v, mask);
                w[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            }
        } else {
            for (int k = 0; k < 8; k++) {
                w[k] = _mm256_loadu_si256((const __m256i *)(tiles + 16 + 32 * k));
                aw[k] = _mm256_sign_epi8(w[k], w[k]);
            }
        }
        for (int64_t r = 0; r < M; r++) {
            const block_x8 *x = xq + r * nb + b;
            __m256i s = type == T_Q8_0   ? tile_dot_q8_0(w, aw, x)
                        : type == T_Q4_0 ? tile_dot_q4(w, x, 8)
                                         : tile_dot_q4(w, x, 0);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x->d)), _mm256_cvtepi32_ps(s), acc[r]);
            if (type == T_Q4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x->s), acc[r]); /* + m * sum x */
        }
    }
    for (int64_t r = 0; r < M; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

/* Groups g0..g1 against all M activation rows, MAX_ROWS rows at a time: a group's tiles
 * (8 rows x K) stay in cache while every row chunk passes, so a prompt reads the weights
 * from memory once, and each row's result is the decode kernel's, bit for bit. */
AVX2 static void gemv_groups_x8(int type, const uint8_t *W, size_t group_bytes, int64_t g0, int64_t g1,
                                int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *tiles = W + g * group_bytes;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t m = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            const block_x8 *x = xq + r0 * nb;
            float *out = y + r0 * N + X8 * g;
            if (type == T_Q4_0)
                m == 1 ? gemv_group_x8(T_Q4_0, tiles, nb, x, 1, N, out)
                       : gemv_group_x8(T_Q4_0, tiles, nb, x, m, N, out);
            else if (type == T_Q4_1)
                m == 1 ? gemv_group_x8(T_Q4_1, tiles, nb, x, 1, N, out)
                       : gemv_group_x8(T_Q4_1, tiles, nb, x, m, N, out);
            else
                m == 1 ? gemv_group_x8(T_Q8_0, tiles, nb, x, 1, N, out)
                       : gemv_group_x8(T_Q8_0, tiles, nb, x, m, N, out);
        }
    }
}
#endif

/* ---- drivers -------------------------------------------------------------------- */

/* Rows per unit of work. The schedule is static: each thread streams one contiguous
 * slice of W, which the hardware prefetchers follow; handing out small chunks
 * dynamically interleaves the threads' reads and cost a third of the bandwidth here. */
#define ROW_CHUNK 16

static void gemv(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M,
                 float *y, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    block_x8 *xq = malloc(sizeof(block_x8) * (size_t)(M * nb));
    if (!xq) return;
    for (int64_t r = 0; r < M; r++) {
#if HAVE_X86
        if (use_avx2) {
            quantize_x8_avx2(x + r * K, xq + r * nb, nb, type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0);
            continue;
        }
#endif
        quantize_x8_ref(x + r * K, xq + r * nb, nb);
    }
    const int64_t chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * ROW_CHUNK, n1 = n0 + ROW_CHUNK < N ? n0 + ROW_CHUNK : N;
#if HAVE_X86
        if (use_avx2) { gemv_rows_avx2(type, W, row_bytes, n0, n1, nb, xq, M, N, y); continue; }
#endif
        gemv_rows_ref(type, W, row_bytes, n0, n1, nb, xq, M, N, y);
    }
    free(xq);
}


/* x8 layout: AVX2 only (kernels.py repacks only where simd() == "avx2"). */
static void gemv_x8(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M,
                    float *y, int threads) {
#if HAVE_X86
    const int64_t nb = K / QK, groups = N / X8;
    const size_t group_bytes = (size_t)X8 * nb * block_bytes(type);
    block_x8 *xq = malloc(sizeof(block_x8) * (size_t)(M * nb));
    if (!xq) return;
    for (int64_t r = 0; r < M; r++) quantize_x8_avx2(x + r * K, xq + r * nb, nb, 0);
    const int64_t per_chunk = ROW_CHUNK / X8 > 0 ? ROW_CHUNK / X8 : 1;
    const int64_t chunks = (groups + per_chunk - 1) / per_chunk;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t g0 = c * per_chunk, g1 = g0 + per_chunk < groups ? g0 + per_chunk : groups;
        gemv_groups_x8(type, W, group_bytes, g0, g1, nb, xq, M, N, y);
    }
    free(xq);
#endif
}

static void dequantize(int type, const uint8_t *W, int64_t N, int64_t K, float *out, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    const int64_t chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * ROW_CHUNK, n1 = n0 + ROW_CHUNK < N ? n0 + ROW_CHUNK : N;
#if HAVE_X86
        if (use_avx2) { dequant_rows_avx2(type, W, row_bytes, n0, n1, nb, out); continue; }
#endif
        dequant_rows_ref(type, W, row_bytes, n0, n1, nb, out);
    }
}

/* ---- Python bindings ------------------------------------------------------------ */

static int check_args(int type, Py_ssize_t K, Py_ssize_t M, int threads) {
    if (!block_bytes(type)) {
        PyErr_Format(PyExc_ValueError, "unsupported GGML type %d", type);
        return 0;
    }
    if (K <= 0 || K % QK) {
        PyErr_Format(PyExc_ValueError, "row length %zd is not a positive multiple of %d", K, QK);
        return 0;
    }
    if (M < 0 || M > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "gemv takes 0..%d activation rows, got %zd", MAX_ROWS, M);
        return 0;
    }
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", threads);
        return 0;
    }
    return 1;
}

static PyObject *py_gemv(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!check_args(type, K, M, threads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    gemv(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M, (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long w, out;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKnnKi", &type, &w, &N, &K, &out, &threads)) return NULL;
    if (!check_args(type, K, 0, threads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dequantize(type, (const uint8_t *)(uintptr_t)w, N, K, (float *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(use_avx2 ? "avx2" : "portable");
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "portable") == 0) {
        use_avx2 = 0;
    } else if (strcmp(name, "avx2") == 0) {
#if HAVE_X86
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
            PyErr_SetString(PyExc_ValueError, "this CPU has no AVX2/FMA/F16C");
            return NULL;
        }
        use_avx2 = 1;
#else
        PyErr_SetString(PyExc_ValueError, "AVX2 kernels exist only on x86");
        return NULL;
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "unknown SIMD path %s (avx2 or portable)", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_gemv_x8(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!check_args(type, K, 0, threads)) return NULL; /* any M: row chunks loop inside */
    if (M < 0) {
        PyErr_SetString(PyExc_ValueError, "negative row count");
        return NULL;
    }
    if (type == T_Q5_0 || N % X8 || !use_avx2) {
        PyErr_SetString(PyExc_ValueError, "x8 kernels take Q4_0/Q4_1/Q8_0, rows a multiple of 8, and AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gemv_x8(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M, (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_repack(PyObject *self, PyObject *args) {
    int type, to_x8;
    unsigned long long src, dst;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKKnnp", &type, &src, &dst, &N, &K, &to_x8)) return NULL;
    if (!check_args(type, K, 0, 1)) return NULL;
    if (N % X8) {
        PyErr_Format(PyExc_ValueError, "x8 repacking needs a multiple of 8 rows, got %zd", N);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    repack(type, (const uint8_t *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, N, K / QK, to_x8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gemv_x8", py_gemv_x8, METH_VARARGS, "gemv_x8(type, w_ptr, N, K, x_ptr, M, y_ptr, threads): y[M,N] = x @ W.T on x8 tiles, any M"},
    {"repack", py_repack, METH_VARARGS, "repack(type, src_ptr, dst_ptr, N, K, to_x8): GGML rows <-> x8 tiles"},
    {"gemv", py_gemv, METH_VARARGS, "gemv(type, w_ptr, N, K, x_ptr, M, y_ptr, threads): y[M,N] = x[M,K] @ W.T"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(type, w_ptr, N, K, out_ptr, threads): out[N,K] = W"},
    {"simd", py_simd, METH_NOARGS, "the SIMD path in use: 'avx2' or 'portable'"},
    {"set_simd", py_set_simd, METH_VARARGS, "choose the SIMD path (tests compare the two)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "GGML block kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) half_table[h] = half_to_float((uint16_t)h);
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&module);
}
