/* Decode attention straight from the paged KV pool: one query token per sequence, any
 * number of sequences in one call. Included once by _kernels.c (after kernels_float.h,
 * whose weight_at/tail_mask it uses, and kernels_scan.h, whose exp2 it uses).
 *
 * Why: a decode step attends one new token per sequence to its cached keys. Through
 * PyTorch that is a gather of the sequence's K/V blocks (index_select), a mask, and
 * scaled_dot_product_attention, each with a fixed cost of tens of microseconds per layer
 * for a few hundred thousand multiply-adds; 24 layers of it were ~15 % of a 1 B model's
 * Q4_0 decode step. Here each (sequence, head) reads its keys and values where they lie
 * in the pool, by slot number.
 *
 *   s_j = (q . k_j) * scale + bias[h, j]       j = 0..S-1, the sequence's keys in order
 *   out = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
 *
 * The dot products are fp32 FMAs over 8 lanes folded in hsum's order; the exp is the
 * scan kernels' exp2 polynomial (relative error < 2e-7). One (sequence, head) is always
 * computed by one thread in one order, so a sequence's output never depends on its
 * neighbours in the batch or on the thread count: batching keeps results bit-exact.
 *
 * q, out: (B, H, D) fp32. Pools: (slots, K, D) fp32, bf16 or fp16. slots: int64, the B
 * sequences' key slots one after another, sequence b's at [starts[b], starts[b+1]).
 * bias: NULL or (H, bias_stride) fp32 by key position (ALiBi), shared by all sequences.
 */

#define ATT_SERIAL_FMAS (1 << 15) /* below this many multiply-adds one thread does it all */

static inline float att_dot_ref(const float *q, const uint8_t *k, int wt, int64_t D) {
    float lanes[8] = {0};
    for (int64_t d = 0; d < D; d++) lanes[d % 8] = fmaf(q[d], weight_at(wt, k, d), lanes[d % 8]);
    return fold8(lanes);
}

static void attend_head_ref(const float *q, const uint8_t *kp, const uint8_t *vp, int wt, const int64_t *slots,
                            int64_t S, int64_t kv, int64_t K, int64_t D, const float *bias, float scale,
                            float *s, float *out) {
    const size_t row = (size_t)K * D * weight_size(wt), off = (size_t)kv * D * weight_size(wt);
    float m = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        s[j] = att_dot_ref(q, kp + slots[j] * row + off, wt, D) * scale + (bias ? bias[j] : 0.0f);
        m = s[j] > m ? s[j] : m;
    }
    float l = 0.0f;
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        const float p = scan_exp2_ref((s[j] - m) * EXP_LOG2E);
        l += p;
        const uint8_t *v = vp + slots[j] * row + off;
        for (int64_t d = 0; d < D; d++) out[d] = fmaf(p, weight_at(wt, v, d), out[d]);
    }
    for (int64_t d = 0; d < D; d++) out[d] /= l;
}

#if HAVE_X86
/* `full`: D is a multiple of 8 (every head size falconet meets), known at compile time
 * in the dispatcher's copies, so the loads need no tail checks. */
AVX2 static inline __attribute__((always_inline)) __m256 att_load8(int wt, int full, const uint8_t *row,
                                                                  int64_t d, int64_t D) {
    return full || D - d >= 8 ? load_w8(wt, row, d) : load_w_tail(wt, row, d, (int)(D - d));
}

AVX2 static inline __attribute__((always_inline)) __m256 att_dot8(const float *q, const uint8_t *k, int wt,
                                                                  int full, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = full ? _mm256_loadu_ps(q + d) : _mm256_maskload_ps(q + d, tail_mask(D - d >= 8 ? 8 : (int)(D - d)));
        acc = _mm256_fmadd_ps(qd, att_load8(wt, full, k, d, D), acc);
    }
    return acc;
}

/* The same operations in the same order as attend_head_ref, 8 lanes at a time. The
 * loops are arranged for independent FMA chains: 4 keys' dot products side by side, and
 * the weighted sum of values over 64 output lanes (8 registers) at a time, key by key. */
AVX2 static inline __attribute__((always_inline)) void attend_head_avx2_as(
                                  int wt, int full, const float *q, const uint8_t *kp, const uint8_t *vp,
                                  const int64_t *slots, int64_t S, int64_t kv, int64_t K, int64_t D,
                                  const float *bias, float scale, float *s, float *out) {
    const size_t row = (size_t)K * D * weight_size(wt), off = (size_t)kv * D * weight_size(wt);
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) {
        __m256 a[4];
        for (int i = 0; i < 4; i++) a[i] = att_dot8(q, kp + slots[j + i] * row + off, wt, full, D);
        for (int i = 0; i < 4; i++) s[j + i] = hsum(a[i]) * scale + (bias ? bias[j + i] : 0.0f);
    }
    for (; j < S; j++) s[j] = hsum(att_dot8(q, kp + slots[j] * row + off, wt, full, D)) * scale + (bias ? bias[j] : 0.0f);
    float m = -INFINITY;
    for (j = 0; j < S; j++) m = s[j] > m ? s[j] : m;
    const int64_t S8 = S & ~(int64_t)7;
    for (j = 0; j < S8; j += 8) /* the exps, 8 at a time (the ref's bits) */
        _mm256_storeu_ps(s + j, scan_exp2_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)),
                                                             _mm256_set1_ps(EXP_LOG2E))));
    for (; j < S; j++) s[j] = scan_exp2_ref((s[j] - m) * EXP_LOG2E);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (j = 0; j < S; j++) {
            const __m256 p = _mm256_set1_ps(s[j]);
            const uint8_t *v = vp + slots[j] * row + off;
            for (int i = 0; i < 8; i++)
                if (d0 + 8 * i < D) acc[i] = _mm256_fmadd_ps(p, att_load8(wt, full, v, d0 + 8 * i, D), acc[i]);
        }
        for (int i = 0; i < 8 && d0 + 8 * i < D; i++)
            _mm256_maskstore_ps(out + d0 + 8 * i, tail_mask(D - d0 - 8 * i >= 8 ? 8 : (int)(D - d0 - 8 * i)), acc[i]);
    }
    float l = 0.0f;
    for (j = 0; j < S; j++) l += s[j];
    for (int64_t d = 0; d < D; d++) out[d] /= l;
}

/* attend_head_avx2_as compiled for each pool dtype with whole 8-lane vectors, and once
 * for any head size. */
AVX2 static void attend_head_avx2(const float *q, const uint8_t *kp, const uint8_t *vp, int wt,
                                  const int64_t *slots, int64_t S, int64_t kv, int64_t K, int64_t D,
                                  const float *bias, float scale, float *s, float *out) {
    if (D % 8)
        attend_head_avx2_as(wt, 0, q, kp, vp, slots, S, kv, K, D, bias, scale, s, out);
    else if (wt == W_F32)
        attend_head_avx2_as(W_F32, 1, q, kp, vp, slots, S, kv, K, D, bias, scale, s, out);
    else if (wt == W_BF16)
        attend_head_avx2_as(W_BF16, 1, q, kp, vp, slots, S, kv, K, D, bias, scale, s, out);
    else
        attend_head_avx2_as(W_F16, 1, q, kp, vp, slots, S, kv, K, D, bias, scale, s, out);
}
#endif

/* Returns 0, or -1 when out of memory. */
static int decode_attention(const float *q, const uint8_t *kp, const uint8_t *vp, int wt, const int64_t *slots,
                            const int64_t *starts, int64_t B, int64_t H, int64_t K, int64_t D, const float *bias,
                            int64_t bias_stride, float scale, float *out, int threads) {
    int64_t smax = 0;
    for (int64_t b = 0; b < B; b++) smax = starts[b + 1] - starts[b] > smax ? starts[b + 1] - starts[b] : smax;
    const int64_t work = (starts[B] - starts[0]) * H * D;
    if (work < ATT_SERIAL_FMAS) threads = 1;
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * (size_t)(smax ? smax : 1));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!s) continue;
            const int64_t b = bh / H, h = bh % H, kv = h / (H / K);
            const int64_t *sl = slots + starts[b], S = starts[b + 1] - starts[b];
            const float *bh_bias = bias ? bias + h * bias_stride : NULL;
#if HAVE_X86
            if (use_avx2) {
                attend_head_avx2(q + bh * D, kp, vp, wt, sl, S, kv, K, D, bh_bias, scale, s, out + bh * D);
                continue;
            }
#endif
            attend_head_ref(q + bh * D, kp, vp, wt, sl, S, kv, K, D, bh_bias, scale, s, out + bh * D);
        }
        free(s);
    }
    return failed ? -1 : 0;
}
