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
 * linear_rows (kernels_float.h): the same for fp32/bf16/fp16 weights, used by
 * falconet.linear.Linear where a row's result must not depend on its batch neighbours.
 *
 * kq_gemm (kernels_kquants.h): llama.cpp's K-quant weights (Q2_K..Q6_K, 256-value
 * super-blocks) against activations rounded to Q8_K, in the file's bytes.
 *
 * selective_scan, ssd_scan (kernels_scan.h): Mamba-1's and Mamba-2's recurrences over
 * a prompt, for falconet/nn/selective_scan.py and ssd.py; not weight kernels, but they
 * share the build, the SIMD switch and the threads.
 *
 * Paths: AVX2 (+FMA, F16C) chosen at run time; a portable C path for everything else.
 * The x8 tiles also have an AVX-512 VNNI loop (vpdpbusd), taken where the CPU has it:
 * the same integer sums, so the same bits, with half the multiply instructions.
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
/* AVX-512 VNNI's vpdpbusd on 256-bit registers (x8 tiles only; Zen 4, Ice Lake and later) */
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
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
static int use_vnni; /* the x8 tiles' int8 products through vpdpbusd (same bits as AVX2's) */

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

#include "kernels_rows.h" /* AVX2 row-major kernels */
#include "kernels_x8.h"   /* interleaved 8-row tiles */
#include "kernels_quantize.h" /* reference-exact quantizers */
#include "kernels_kblocks.h"   /* 256-value super-block layouts */
#include "kernels_kquantize.h" /* reference-exact K-quant quantizers */

/* ---- drivers -------------------------------------------------------------------- */

/* Rows per unit of work. Each thread streams contiguous slices of W, which the hardware
 * prefetchers follow; handing out small chunks dynamically interleaves the threads'
 * reads and cost a third of the bandwidth here (the x8 GEMV hands out long runs). */
#define ROW_CHUNK 16
#define X8_UNITS_PER_THREAD 8

/* Units of `per` out of n items, and unit c's [lo, hi). */
static inline int64_t n_units(int64_t n, int64_t per) { return (n + per - 1) / per; }
static inline void unit_bounds(int64_t c, int64_t n, int64_t per, int64_t *lo, int64_t *hi) {
    *lo = c * per;
    *hi = *lo + per < n ? *lo + per : n;
}

/* The M activation rows rounded to 8-bit blocks (malloc'd; NULL when out of memory). */
static block_x8 *quantize_activations(int type, const float *x, int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    block_x8 *xq = malloc(sizeof(block_x8) * (size_t)(M * nb ? M * nb : 1));
    if (!xq) return NULL;
    for (int64_t r = 0; r < M; r++) {
#if HAVE_X86
        if (use_avx2) {
            quantize_x8_avx2(x + r * K, xq + r * nb, nb, type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0);
            continue;
        }
#endif
        quantize_x8_ref(x + r * K, xq + r * nb, nb);
    }
    return xq;
}

static void gemv(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M,
                 float *y, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    block_x8 *xq = quantize_activations(type, x, M, K);
    if (!xq) return;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_units(N, ROW_CHUNK); c++) {
        int64_t n0, n1;
        unit_bounds(c, N, ROW_CHUNK, &n0, &n1);
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
    block_x8 *xq = quantize_activations(type, x, M, K); /* use_avx2: kernels.py checks */
    if (!xq) return;
    (void)threads;
    /* X8_UNITS_PER_THREAD contiguous runs of groups per thread, handed out as threads free
     * up: each run is long enough for the prefetchers (hundreds of KB), and a thread that
     * shares its core with another process takes fewer runs instead of holding the whole
     * call back (a static split waits for the slowest thread). A group is always one
     * thread's, so the bits never depend on the schedule. */
    int64_t per = groups / ((int64_t)threads * X8_UNITS_PER_THREAD);
    per = per < ROW_CHUNK / X8 ? ROW_CHUNK / X8 : per;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_units(groups, per); c++) {
        int64_t g0, g1;
        unit_bounds(c, groups, per, &g0, &g1);
        gemv_groups_x8(type, W, group_bytes, g0, g1, nb, xq, M, N, y);
    }
    free(xq);
#endif
}

static void dequantize(int type, const uint8_t *W, int64_t N, int64_t K, float *out, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_units(N, ROW_CHUNK); c++) {
        int64_t n0, n1;
        unit_bounds(c, N, ROW_CHUNK, &n0, &n1);
#if HAVE_X86
        if (use_avx2) { dequant_rows_avx2(type, W, row_bytes, n0, n1, nb, out); continue; }
#endif
        dequant_rows_ref(type, W, row_bytes, n0, n1, nb, out);
    }
}

#include "kernels_kquants.h" /* Q2_K..Q6_K weights x Q8_K activations */
#include "kernels_kq_x8.h"   /* Q4_K in interleaved 8-row tiles */
#include "kernels_float.h" /* row-invariant fp32/bf16/fp16 linear */
#include "kernels_lora.h"  /* LoRA updates of decode rows, each its own adapter */
#include "kernels_scan.h"  /* Mamba-1 selective scan, Mamba-2 SSD recurrence */
#include "kernels_attention.h" /* decode attention over the paged KV pool */
#include "kernels_activation.h" /* erf GELU on the calling thread */
#include "kernels_ternary.h" /* BitNet int8 x 2-bit products */
#include "kernels_tq2.h"     /* llama.cpp TQ2_0 blocks x Q8_K activations */

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

/* gemv(...) on GGML rows (at most MAX_ROWS activation rows) or gemv_x8(...) on x8 tiles
 * (any number of rows): the same arguments, checked before the pointers are used. */
static PyObject *run_gemv(PyObject *args, int x8) {
    int type, threads;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!check_args(type, K, x8 ? 0 : M, threads)) return NULL;
    if (M < 0) {
        PyErr_SetString(PyExc_ValueError, "negative row count");
        return NULL;
    }
    if (x8 && (type == T_Q5_0 || N % X8 || !use_avx2)) {
        PyErr_SetString(PyExc_ValueError, "x8 kernels take Q4_0/Q4_1/Q8_0, rows a multiple of 8, and AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    (x8 ? gemv_x8 : gemv)(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M,
                          (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_gemv(PyObject *self, PyObject *args) { return run_gemv(args, 0); }

static PyObject *py_gemv_x8(PyObject *self, PyObject *args) { return run_gemv(args, 1); }

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long x, out;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKnnKi", &type, &x, &N, &K, &out, &threads)) return NULL;
    if (!check_args(type, K, 0, threads)) return NULL;
#if HAVE_X86
    if (!__builtin_cpu_supports("f16c")) {
        PyErr_SetString(PyExc_ValueError, "the compiled quantizers need F16C");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = quantize_rows(type, (const float *)(uintptr_t)x, N, K, (uint8_t *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
#else
    PyErr_SetString(PyExc_ValueError, "the compiled quantizers exist only on x86");
    return NULL;
#endif
}

static PyObject *py_kquantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long x, out;
    Py_ssize_t nblocks;
    if (!PyArg_ParseTuple(args, "iKnKi", &type, &x, &nblocks, &out, &threads)) return NULL;
    if (!kq_block_bytes(type) || nblocks < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "kquantize needs a K-quant type (10-14), nblocks >= 0, threads >= 1; got %d, %zd, %d",
                     type, nblocks, threads);
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = kquantize_blocks(type, (const float *)(uintptr_t)x, nblocks, (uint8_t *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
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

static PyObject *py_linear_rows(PyObject *self, PyObject *args) {
    int wt, threads, rc;
    unsigned long long x, w, out;
    Py_ssize_t M, K, N;
    if (!PyArg_ParseTuple(args, "KKKnnnii", &x, &w, &out, &M, &K, &N, &wt, &threads)) return NULL;
    const int round_out = !(wt & LINEAR_UNROUNDED);
    wt &= ~LINEAR_UNROUNDED;
    if (wt != W_F32 && wt != W_BF16 && wt != W_F16) {
        PyErr_Format(PyExc_ValueError, "weight dtype code %d is not 0 (fp32), 1 (bf16) or 2 (fp16)", wt);
        return NULL;
    }
    if (M < 0 || K <= 0 || N < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "linear_rows needs M >= 0, K > 0, N >= 0, threads >= 1; got %zd, %zd, %zd, %d",
                     M, K, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = linear_rows(wt, round_out, (const float *)(uintptr_t)x, (const uint8_t *)(uintptr_t)w, (float *)(uintptr_t)out, M, K,
                     N, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_lora_rows(PyObject *self, PyObject *args) {
    unsigned long long x, A, Bt, start, rank, scale, rows, y;
    Py_ssize_t R, K, N;
    int x_bf16, y_bf16, threads, rc;
    if (!PyArg_ParseTuple(args, "KinnKKnKKKKKii", &x, &x_bf16, &R, &K, &A, &Bt, &N, &start, &rank, &scale, &rows,
                          &y, &y_bf16, &threads))
        return NULL;
    if (R < 0 || K <= 0 || N <= 0 || threads < 1 || (x_bf16 != 0 && x_bf16 != 1) || (y_bf16 != 0 && y_bf16 != 1)) {
        PyErr_Format(PyExc_ValueError, "lora_rows needs R >= 0, K > 0, N > 0, x_bf16 and y_bf16 0 or 1, "
                     "threads >= 1; got %zd, %zd, %zd, %d, %d, %d", R, K, N, x_bf16, y_bf16, threads);
        return NULL;
    }
    /* A decode step's call takes tens of microseconds: releasing the GIL for it would let
     * the server's event loop take it for up to a switch interval (5 ms) per layer. */
    PyThreadState *ts = R * (K + N) >= LORA_RELEASE_GIL ? PyEval_SaveThread() : NULL;
    rc = lora_rows((const void *)(uintptr_t)x, x_bf16, R, K, (const float *)(uintptr_t)A, (const float *)(uintptr_t)Bt, N,
                   (const int32_t *)(uintptr_t)start, (const int32_t *)(uintptr_t)rank,
                   (const float *)(uintptr_t)scale, (const int64_t *)(uintptr_t)rows, (void *)(uintptr_t)y, y_bf16,
                   threads);
    if (ts) PyEval_RestoreThread(ts);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_selective_scan(PyObject *self, PyObject *args) {
    unsigned long long h, u, dt, A, B, C, y;
    Py_ssize_t batch, T, E, N;
    int threads, rc;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnnni", &h, &u, &dt, &A, &B, &C, &y, &batch, &T, &E, &N, &threads))
        return NULL;
    if (batch < 0 || T < 0 || E < 1 || N < 1 || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "selective_scan needs batch >= 0, T >= 0, E >= 1, N >= 1, threads >= 1; got %zd, %zd, %zd, %zd, %d",
                     batch, T, E, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = selective_scan((float *)(uintptr_t)h, (const float *)(uintptr_t)u, (const float *)(uintptr_t)dt,
                        (const float *)(uintptr_t)A, (const float *)(uintptr_t)B, (const float *)(uintptr_t)C,
                        (float *)(uintptr_t)y, batch, T, E, N, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, kp, vp, slots, starts, bias, out;
    Py_ssize_t B, H, K, D, bias_stride;
    int wt, threads, rc;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKiKKnnnnKnfKi", &q, &kp, &vp, &wt, &slots, &starts, &B, &H, &K, &D, &bias,
                          &bias_stride, &scale, &out, &threads))
        return NULL;
    if (wt < W_F32 || wt > W_F16 || B < 0 || H < 1 || K < 1 || H % K || D < 1 || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "decode_attention needs a fp32/bf16/fp16 pool, B >= 0, H a multiple of K >= 1, D >= 1, "
                     "threads >= 1; got dtype %d, B %zd, H %zd, K %zd, D %zd, threads %d",
                     wt, B, H, K, D, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = decode_attention((const float *)(uintptr_t)q, (const uint8_t *)(uintptr_t)kp, (const uint8_t *)(uintptr_t)vp,
                          wt, (const int64_t *)(uintptr_t)slots, (const int64_t *)(uintptr_t)starts, B, H, K, D,
                          (const float *)(uintptr_t)bias, bias_stride, scale, (float *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_gelu(PyObject *self, PyObject *args) {
    unsigned long long x, y;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKn", &x, &y, &n)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "gelu needs n >= 0, got %zd", n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gelu_erf((const float *)(uintptr_t)x, (float *)(uintptr_t)y, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ssd_scan(PyObject *self, PyObject *args) {
    unsigned long long S, x, dt, A, D, B, C, y;
    Py_ssize_t batch, T, H, P, G, N;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnni", &S, &x, &dt, &A, &D, &B, &C, &y, &batch, &T, &H, &P, &G, &N,
                          &threads))
        return NULL;
    if (batch < 0 || T < 0 || H < 1 || P < 1 || G < 1 || N < 1 || H % G || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "ssd_scan needs batch, T >= 0, H, P, G, N >= 1 with G dividing H, threads >= 1; "
                     "got %zd, %zd, %zd, %zd, %zd, %zd, %d",
                     batch, T, H, P, G, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ssd_scan((float *)(uintptr_t)S, (const float *)(uintptr_t)x, (const float *)(uintptr_t)dt,
             (const float *)(uintptr_t)A, (const float *)(uintptr_t)D, (const float *)(uintptr_t)B,
             (const float *)(uintptr_t)C, (float *)(uintptr_t)y, batch, T, H, P, G, N, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ternary_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, p, out;
    Py_ssize_t M, K, R;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &p, &out, &M, &K, &R, &threads)) return NULL;
    if (M < 0 || K < 0 || R < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "ternary_matmul needs M, K, R >= 0 and threads >= 1; got %zd, %zd, %zd, %d",
                     M, K, R, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ternary_matmul((const int8_t *)(uintptr_t)x, (const uint8_t *)(uintptr_t)p, (int32_t *)(uintptr_t)out, M, K, R,
                   threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_tq2_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    Py_ssize_t M, K, N;
    int threads, rc;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &w, &y, &M, &K, &N, &threads)) return NULL;
    if (M < 0 || K < 0 || N < 0 || K % QK_K || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "tq2_matmul needs M, N >= 0, K a multiple of %d and threads >= 1; got %zd, %zd, %zd, %d",
                     QK_K, M, K, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = tq2_matmul((const float *)(uintptr_t)x, (const uint8_t *)(uintptr_t)w, (float *)(uintptr_t)y, M, K, N,
                    threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* kq_gemm(type, w_ptr, N, K, x_ptr, M, y_ptr, threads), any M, on GGUF rows; or
 * kq_gemm_x8(...) the same on Q4_K x8 tiles (kernels_kq_x8.h) */
static PyObject *run_kq_gemm(PyObject *args, int x8) {
    int type, threads, rc = 0;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!kq_block_bytes(type)) {
        PyErr_Format(PyExc_ValueError, "kq_gemm takes the K-quant types 10..14, got GGML type %d", type);
        return NULL;
    }
    if (K <= 0 || K % QK_K || N < 0 || M < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "kq_gemm needs K a positive multiple of %d, N, M >= 0, threads >= 1; "
                     "got K=%zd, N=%zd, M=%zd, threads=%d", QK_K, K, N, M, threads);
        return NULL;
    }
    if (x8 && (!kq_x8_type(type) || N % X8 || !use_avx2)) {
        PyErr_SetString(PyExc_ValueError, "kq x8 tiles are Q4_K, Q5_K or Q6_K, rows a multiple of 8, on AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#if HAVE_X86
    if (x8)
        rc = kq_gemm_x8(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M, (float *)(uintptr_t)y,
                        threads);
    else
#endif
        rc = kq_gemm(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M,
                     (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_kq_gemm(PyObject *self, PyObject *args) { return run_kq_gemm(args, 0); }

static PyObject *py_kq_gemm_x8(PyObject *self, PyObject *args) { return run_kq_gemm(args, 1); }

/* kq_repack(type, src_ptr, dst_ptr, N, K, to_x8): Q4_K / Q5_K / Q6_K rows <-> kq x8 tiles */
static PyObject *py_kq_repack(PyObject *self, PyObject *args) {
    int type, to_x8;
    unsigned long long src, dst;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKKnnp", &type, &src, &dst, &N, &K, &to_x8)) return NULL;
    if (!kq_x8_type(type)) {
        PyErr_Format(PyExc_ValueError, "kq x8 tiles are Q4_K (12), Q5_K (13) or Q6_K (14), got GGML type %d", type);
        return NULL;
    }
    if (K <= 0 || K % QK_K || N < 0 || N % X8) {
        PyErr_Format(PyExc_ValueError, "kq_repack needs K a positive multiple of %d and N a multiple of %d; "
                     "got K=%zd, N=%zd", QK_K, X8, K, N);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_repack(type, (const uint8_t *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, N, K / QK_K, to_x8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_quantize_q8_K(PyObject *self, PyObject *args) {
    unsigned long long x, out;
    Py_ssize_t M, K;
    if (!PyArg_ParseTuple(args, "KnnK", &x, &M, &K, &out)) return NULL;
    if (K <= 0 || K % QK_K || M < 0) {
        PyErr_Format(PyExc_ValueError, "quantize_q8_K needs K a positive multiple of %d and M >= 0", QK_K);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_quantize_activations((const float *)(uintptr_t)x, M, K, (block_q8_K *)(uintptr_t)out);
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

#if HAVE_X86
static int vnni_supported(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
}
#endif

static PyObject *py_int8_dot(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(use_vnni ? "vnni" : "maddubs");
}

static PyObject *py_set_int8_dot(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "maddubs") == 0) {
        use_vnni = 0;
        Py_RETURN_NONE;
    }
    if (strcmp(name, "vnni") != 0) {
        PyErr_Format(PyExc_ValueError, "unknown int8 dot product %s (vnni or maddubs)", name);
        return NULL;
    }
#if HAVE_X86
    if (vnni_supported()) {
        use_vnni = 1;
        Py_RETURN_NONE;
    }
#endif
    PyErr_SetString(PyExc_ValueError, "this CPU has no AVX-512 VNNI");
    return NULL;
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
    {"quantize", py_quantize, METH_VARARGS, "quantize(type, x_ptr, N, K, out_ptr, threads) -> -1 or the first block whose fp16 field overflowed"},
    {"kquantize", py_kquantize, METH_VARARGS, "kquantize(type, x_ptr, nblocks, out_ptr, threads) -> -1 or the first block whose fp16 scale overflowed: 256-value super-blocks to Q2_K..Q6_K (GGML type 10-14), as llama.cpp's reference quantizers"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(type, w_ptr, N, K, out_ptr, threads): out[N,K] = W"},
    {"linear_rows", py_linear_rows, METH_VARARGS, "linear_rows(x_ptr, w_ptr, out_ptr, M, K, N, w_dtype, threads): out[M,N] = x[M,K] @ W[N,K].T, fp32 x and out, W fp32 (0), bf16 (1) or fp16 (2), plus 16: out not rounded to W's dtype; each element in one fixed order"},
    {"lora_rows", py_lora_rows, METH_VARARGS, "lora_rows(x_ptr, x_bf16, R, K, A_ptr, Bt_ptr, N, start_ptr, rank_ptr, scale_ptr, rows_ptr, y_ptr, y_bf16, threads): y[rows[i]] += scale[i] * Bt[s:s+r].T @ (A[s:s+r] @ x[rows[i]]) for R rows (x fp32 or bf16; s = start[i], r = rank[i]; A ranks x K, Bt ranks x N fp32; y fp32 or bf16, rows x N), each row in one fixed order (kernels_lora.h)"},
    {"selective_scan", py_selective_scan, METH_VARARGS, "selective_scan(h_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, batch, T, E, N, threads): Mamba-1's scan over T tokens, fp32, h (batch,E,N) advanced in place, y (batch,T,E) written"},
    {"ssd_scan", py_ssd_scan, METH_VARARGS, "ssd_scan(S_ptr, x_ptr, dt_ptr, A_ptr, D_ptr, B_ptr, C_ptr, y_ptr, batch, T, H, P, G, N, threads): Mamba-2's recurrence over T tokens, fp32, S (batch,H,P,N) advanced in place, y (batch,T,H,P) written with the D skip"},
    {"ternary_matmul", py_ternary_matmul, METH_VARARGS, "ternary_matmul(x_ptr, p_ptr, out_ptr, M, K, R, threads): out[M,4R] int32 = x[M,K] int8 @ W.T, W ternary packed 4 rows per byte in P[R,K] (transformers' BitNet layout)"},
    {"decode_attention", py_decode_attention, METH_VARARGS, "decode_attention(q_ptr, k_pool_ptr, v_pool_ptr, pool_dtype, slots_ptr, starts_ptr, B, H, K, D, bias_ptr, bias_stride, scale, out_ptr, threads): one query per sequence against its keys in the paged pool (kernels_attention.h)"},
    {"gelu", py_gelu, METH_VARARGS, "gelu(x_ptr, y_ptr, n): y = x/2 (1 + erf(x/sqrt 2)) over n fp32 values, on the calling thread (kernels_activation.h)"},
    {"tq2_matmul", py_tq2_matmul, METH_VARARGS, "tq2_matmul(x_ptr, w_ptr, y_ptr, M, K, N, threads): y[M,N] fp32 = x[M,K] fp32 @ W.T, W in TQ2_0 blocks [N, K/256*66], x rounded per 256 values as Q8_K"},
    {"kq_gemm", py_kq_gemm, METH_VARARGS, "kq_gemm(type, w_ptr, N, K, x_ptr, M, y_ptr, threads): y[M,N] = x[M,K] @ W.T for K-quant rows (Q2_K..Q6_K), x rounded to Q8_K, any M"},
    {"kq_gemm_x8", py_kq_gemm_x8, METH_VARARGS, "kq_gemm_x8(type, w_ptr, N, K, x_ptr, M, y_ptr, threads): kq_gemm on Q4_K / Q5_K / Q6_K x8 tiles (type 12, 13 or 14, N % 8 == 0, AVX2), the same bits"},
    {"kq_repack", py_kq_repack, METH_VARARGS, "kq_repack(type, src_ptr, dst_ptr, N, K, to_x8): Q4_K / Q5_K / Q6_K rows <-> x8 tiles (a permutation within each group of 8 rows)"},
    {"quantize_q8_K", py_quantize_q8_K, METH_VARARGS, "quantize_q8_K(x_ptr, M, K, out_ptr): fp32 x[M,K] -> M*K/256 Q8_K blocks of 292 bytes (float d, int8 qs[256], int16 bsums[16])"},
    {"simd", py_simd, METH_NOARGS, "the SIMD path in use: 'avx2' or 'portable'"},
    {"set_simd", py_set_simd, METH_VARARGS, "choose the SIMD path (tests compare the two)"},
    {"int8_dot", py_int8_dot, METH_NOARGS, "the x8 tiles' int8 product instructions: 'vnni' (AVX-512 VNNI) or 'maddubs' (AVX2)"},
    {"set_int8_dot", py_set_int8_dot, METH_VARARGS, "choose the x8 tiles' int8 products: 'vnni' or 'maddubs' (the same bits; tests compare the two)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "GGML block, float linear and selective scan kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) half_table[h] = half_to_float((uint16_t)h);
    kq_x8_init();
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    use_vnni = use_avx2 && vnni_supported();
#endif
    return PyModule_Create(&module);
}
