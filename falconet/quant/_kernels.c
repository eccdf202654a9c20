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
 *
 * Files: this one holds the shared definitions (block layouts, SIMD and thread
 * switches, activation rounding) and the module table; each kernel family is a header
 * included here once (kernels_*.h), the portable reference kernels in
 * kernels_portable.h, the thread drivers of the GGML-block GEMV/GEMM in
 * kernels_drivers.h and the Python wrappers in kernels_bindings.h.
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

#include "kernels_portable.h" /* reference kernels, any CPU */

#include "kernels_rows.h" /* AVX2 row-major kernels */
#include "kernels_x8.h"   /* interleaved 8-row tiles */
#include "kernels_quantize.h" /* reference-exact quantizers */
#include "kernels_kblocks.h"   /* 256-value super-block layouts */
#include "kernels_kquantize.h" /* reference-exact K-quant quantizers */

#include "kernels_drivers.h" /* GEMV / GEMM over threads */

#include "kernels_kquants.h" /* Q2_K..Q6_K weights x Q8_K activations */
#include "kernels_kq_x8.h"   /* Q4_K in interleaved 8-row tiles */
#include "kernels_float.h" /* row-invariant fp32/bf16/fp16 linear */
#include "kernels_lora.h"  /* LoRA updates of decode rows, each its own adapter */
#include "kernels_scan.h"  /* Mamba-1 selective scan, Mamba-2 SSD recurrence */
#include "kernels_attention.h" /* decode attention over the paged KV pool */
#include "kernels_activation.h" /* erf GELU on the calling thread */
#include "kernels_norm.h"       /* RMSNorm, SwiGLU's gate, rotary on the calling thread */
#include "kernels_ternary.h" /* BitNet int8 x 2-bit products */
#include "kernels_tq2.h"     /* llama.cpp TQ2_0 blocks x Q8_K activations */

#include "kernels_bindings.h" /* the Python functions */

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
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x_ptr, w_ptr, y_ptr, rows, n, eps): y = w * x / sqrt(mean(x^2) + eps) per row of n fp32 values, on the calling thread (kernels_norm.h)"},
    {"rotary", py_rotary, METH_VARARGS, "rotary(x_ptr, sb, sh, st, cos_ptr, sin_ptr, cb, ct, y_ptr, yb, yh, yt, B, H, T, D): y (B,H,T,D) = x * cos + roll(x, D/2) * signed_sin, fp32, torch's bits (kernels_norm.h)"},
    {"silu_gate", py_silu_gate, METH_VARARGS, "silu_gate(g_ptr, u_ptr, y_ptr, n): y = silu(g) * u over n fp32 values, on the calling thread (kernels_norm.h)"},
    {"gelu", py_gelu, METH_VARARGS, "gelu(x_ptr, y_ptr, n): y = x/2 (1 + erf(x/sqrt 2)) over n fp32 values, on the calling thread (kernels_activation.h)"},
    {"tq2_matmul", py_tq2_matmul, METH_VARARGS, "tq2_matmul(x_ptr, w_ptr, y_ptr, M, K, N, threads, x8=False): y[M,N] fp32 = x[M,K] fp32 @ W.T, W in TQ2_0 blocks [N, K/256*66] (GGML rows, or tiles of 8 rows with x8), x rounded per 256 values as Q8_K"},
    {"tq2_repack", py_tq2_repack, METH_VARARGS, "tq2_repack(src_ptr, dst_ptr, N, K, to_x8): TQ2_0 rows <-> tiles of 8 rows (kernels_tq2.h)"},
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
