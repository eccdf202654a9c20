/* llama.cpp's TQ2_0 blocks as they lie in a GGUF file, multiplied without unpacking them
 * to floats: y[M, N] = x[M, K] @ W.T. Included once by _kernels.c.
 *
 * A TQ2_0 row is K/256 blocks of 66 bytes: qs[64], then d (fp16). Byte j of half h
 * (qs[32h + j]) holds the codes q = w + 1 in {0, 1, 2} of values 128h + 32n + j at bits
 * 2n..2n+1, so one 32-byte load, shifted by 2n and masked, gives the codes of 32
 * consecutive values -- the layout is already SIMD-shaped and the kernel reads the
 * file's bytes as they are.
 *
 * The activations are rounded per 256 values to int8 as llama.cpp's Q8_K does
 * (iscale = -127 / max, the signed value of largest magnitude; q = min(127, round(x *
 * iscale)); d = 1 / iscale), so the products are those llama.cpp computes for the file:
 *
 *   y[m, n] = sum_b  d_x[m, b] * d_w[n, b] * (sum_k q_x[k] * q_w[k]  -  sum_k q_x[k])
 *
 * The integer part (codes unsigned for AVX2's maddubs; the "-1" is the block's sum of
 * q_x, subtracted once) is exact. The float part is done in eight lanes: lane j holds
 * the products of values 4j..4j+3 of each 32-value group (what maddubs + madd leave in
 * lane j); per block a lane is converted to float, multiplied by d_x * d_w and added to
 * the lane's running sum; at the end the eight lanes are added in one fixed tree. The
 * portable path computes the same lanes in the same order with -ffp-contract=off, so
 * both paths give the same bits, and a row's result depends on nothing but that row:
 * a batch equals each row alone.
 */

#define TQ_ROWS 4 /* activation rows sharing one unpacking of a weight block */

typedef struct { uint8_t qs[QK_K / 4]; uint16_t d; } block_tq2_0;
_Static_assert(sizeof(block_tq2_0) == 66, "tq2_0 block");

/* An activation block as llama.cpp's Q8_K holds it, with the sum of its quants. */
typedef struct { float d; int32_t bsum; int8_t qs[QK_K]; } block_q8k;

static void quantize_q8k(const float *x, block_q8k *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int i = 0; i < QK_K; i++) {
            const float ax = fabsf(x[i]);
            if (ax > amax) amax = ax, max = x[i];
        }
        int32_t sum = 0;
        if (amax == 0.0f) {
            memset(y[b].qs, 0, QK_K);
            y[b].d = 0.0f;
        } else {
            const float iscale = -127.0f / max;
            for (int i = 0; i < QK_K; i++) {
                const long v = lrintf(iscale * x[i]); /* round half to even, as GGML's nearest_int */
                y[b].qs[i] = (int8_t)(v > 127 ? 127 : v);
                sum += y[b].qs[i];
            }
            y[b].d = 1.0f / iscale;
        }
        y[b].bsum = sum;
    }
}

/* The eight lanes added as _mm256 halves, then pairs, then the last two. */
static float lanes_sum(const float a[8]) {
    const float t0 = a[0] + a[4], t1 = a[1] + a[5], t2 = a[2] + a[6], t3 = a[3] + a[7];
    return (t0 + t2) + (t1 + t3);
}

static void tq2_dot_ref(const block_tq2_0 *w, const block_q8k *y, int64_t nb, float *out) {
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        int32_t lane[8] = {0};
        for (int h = 0; h < 2; h++)
            for (int n = 0; n < 4; n++)
                for (int j = 0; j < 32; j++)
                    lane[j / 4] += ((w[b].qs[32 * h + j] >> (2 * n)) & 3) * y[b].qs[128 * h + 32 * n + j];
        lane[0] -= y[b].bsum;
        const float d = y[b].d * half_table[w[b].d];
        for (int j = 0; j < 8; j++) acc[j] = acc[j] + (float)lane[j] * d;
    }
    *out = lanes_sum(acc);
}

#if HAVE_X86
static float hsum_ps_fixed(__m256 v) AVX2;
static float hsum_ps_fixed(__m256 v) {
    float a[8];
    _mm256_storeu_ps(a, v);
    return lanes_sum(a);
}

/* The dot products: AVX2's, and AVX-512 VNNI's where the CPU has it (same bits). */
#define TQ2_TARGET AVX2
#define TQ2_VNNI 0
#define TQ2_NAME(f) f##_avx2
#include "kernels_tq2_dot.h"
#undef TQ2_TARGET
#undef TQ2_VNNI
#undef TQ2_NAME
#define TQ2_TARGET VNNI
#define TQ2_VNNI 1
#define TQ2_NAME(f) f##_vnni
#include "kernels_tq2_dot.h"
#undef TQ2_TARGET
#undef TQ2_VNNI
#undef TQ2_NAME
#endif

/* y[M, N] (fp32) = x[M, K] (fp32) @ W.T, W N rows of K/256 TQ2_0 blocks. Returns -1 when
 * out of memory, else 0. */
static int tq2_matmul(const float *x, const uint8_t *W, float *y, int64_t M, int64_t K, int64_t N, int threads) {
    const int64_t nb = K / QK_K;
    block_q8k *xq = malloc(sizeof(block_q8k) * (size_t)(M * nb > 0 ? M * nb : 1));
    if (!xq) return -1;
    for (int64_t m = 0; m < M; m++) quantize_q8k(x + m * K, xq + m * nb, nb);
    /* threads over weight rows: each streams a contiguous slice of W once for all M rows */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const block_tq2_0 *w = (const block_tq2_0 *)(W + n * nb * (int64_t)sizeof(block_tq2_0));
        for (int64_t m = 0; m < M; m += TQ_ROWS) {
            const int R = (int)(M - m < TQ_ROWS ? M - m : TQ_ROWS);
            float out[TQ_ROWS];
#if HAVE_X86
            if (use_avx2) {
                const block_q8k *rows[TQ_ROWS];
                for (int r = 0; r < R; r++) rows[r] = xq + (m + r) * nb;
                (use_vnni ? tq2_dot_rows_vnni : tq2_dot_rows_avx2)(w, rows, R, nb, out);
            } else
#endif
                for (int r = 0; r < R; r++) tq2_dot_ref(w, xq + (m + r) * nb, nb, out + r);
            for (int r = 0; r < R; r++) y[(m + r) * N + n] = out[r];
        }
    }
    free(xq);
    return 0;
}
