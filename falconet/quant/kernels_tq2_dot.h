/* The TQ2_0 dot products of kernels_tq2.h, included twice: once for AVX2's maddubs
 * (TQ2_VNNI 0) and once for AVX-512 VNNI's vpdpbusd on 256-bit registers (TQ2_VNNI 1).
 * vpdpbusd adds the four byte products of each 32-bit lane into it, which is what
 * maddubs (pairs into int16) and madd with ones (pairs of those into int32) leave in the
 * lane: the same integers, so the same bits, in fewer instructions. */

/* R (1..TQ_ROWS) activation rows against one weight row; codes unpacked once per group.
 * Inlined into one copy per R (TQ2_NAME(tq2_dot_rows)), so the loops over rows unroll
 * and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_dot)(const block_tq2_0 *w, const block_q8k *const *y,
                                                                   const int R, int64_t nb, float *out) TQ2_TARGET;
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_dot)(const block_tq2_0 *w, const block_q8k *const *y,
                                                                   const int R, int64_t nb, float *out) {
    const __m256i mask = _mm256_set1_epi8(3);
#if !TQ2_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[TQ_ROWS];
    for (int r = 0; r < TQ_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        /* AVX2: int16 partial sums, 8 groups x 2 products x 2 x 128 at most, 4096 < 2^15;
         * VNNI: the int32 lanes themselves */
        __m256i s[TQ_ROWS];
        for (int r = 0; r < TQ_ROWS; r++) s[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * h));
            for (int n = 0; n < 4; n++) {
                const __m256i c = _mm256_and_si256(_mm256_srli_epi16(q, 2 * n), mask);
                for (int r = 0; r < R; r++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(y[r][b].qs + 128 * h + 32 * n));
#if TQ2_VNNI
                    s[r] = _mm256_dpbusd_epi32(s[r], c, v);
#else
                    s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(c, v));
#endif
                }
            }
        }
        const float dw = half_table[w[b].d];
        for (int r = 0; r < R; r++) {
#if TQ2_VNNI
            __m256i lanes = s[r];
#else
            __m256i lanes = _mm256_madd_epi16(s[r], ones);
#endif
            lanes = _mm256_sub_epi32(lanes, _mm256_setr_epi32(y[r][b].bsum, 0, 0, 0, 0, 0, 0, 0));
            const __m256 d = _mm256_set1_ps(y[r][b].d * dw);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), d));
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps_fixed(acc[r]);
}

static void TQ2_NAME(tq2_dot_rows)(const block_tq2_0 *w, const block_q8k *const *y, int R, int64_t nb,
                                   float *out) TQ2_TARGET;
static void TQ2_NAME(tq2_dot_rows)(const block_tq2_0 *w, const block_q8k *const *y, int R, int64_t nb,
                                   float *out) {
    switch (R) {
    case 1: TQ2_NAME(tq2_dot)(w, y, 1, nb, out); break;
    case 2: TQ2_NAME(tq2_dot)(w, y, 2, nb, out); break;
    case 3: TQ2_NAME(tq2_dot)(w, y, 3, nb, out); break;
    default: TQ2_NAME(tq2_dot)(w, y, TQ_ROWS, nb, out); break;
    }
}
