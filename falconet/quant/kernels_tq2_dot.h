/* The TQ2_0 dot products of kernels_tq2.h, included twice: once for AVX2's maddubs
 * (TQ2_VNNI 0) and once for AVX-512 VNNI's vpdpbusd on 256-bit registers (TQ2_VNNI 1).
 * vpdpbusd adds the four byte products of each 32-bit lane into it, which is what
 * maddubs (pairs into int16) and madd with ones (pairs of those into int32) leave in the
 * lane: the same integers, so the same bits, in fewer instructions. vpdpbusd adds into
 * its own accumulator, so one accumulator per row would be a chain of dependent
 * instructions as long as the block (their latency, not their throughput, would bound the
 * loop): with VNNI each row sums into TQ2_ACC accumulators (code shift n into n %
 * TQ2_ACC), added after the block -- integers, so the same sum. maddubs + add has no
 * such chain (the add takes one cycle). */

#if TQ2_VNNI
#define TQ2_ACC 4
#else
#define TQ2_ACC 1
#endif

/* A row's TQ2_ACC accumulators added (integers: any order gives the same sum). */
static inline __attribute__((always_inline)) __m256i TQ2_NAME(tq2_acc_sum)(const __m256i *s) TQ2_TARGET;
static inline __attribute__((always_inline)) __m256i TQ2_NAME(tq2_acc_sum)(const __m256i *s) {
    __m256i t = s[0];
    for (int a = 1; a < TQ2_ACC; a++) t = _mm256_add_epi32(t, s[a]);
    return t;
}

/* R (1..TQ_ROWS) activation rows against one weight row (GGML rows); codes unpacked once
 * per group. Inlined into one copy per R (TQ2_NAME(tq2_dot_rows)), so the loops over
 * rows unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_dot)(const block_tq2_0 *w, const block_q8k *const *y,
                                                                   const int R, int64_t nb, float *out) TQ2_TARGET;
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_dot)(const block_tq2_0 *w, const block_q8k *const *y,
                                                                   const int R, int64_t nb, float *out) {
    const __m256i mask = _mm256_set1_epi8(3);
#if !TQ2_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    float acc[TQ_ROWS] = {0};
    for (int64_t b = 0; b < nb; b++) {
        /* AVX2: int16 partial sums, 8 groups x 2 products x 3 x 127 at most, < 2^15;
         * VNNI: the int32 lanes themselves */
        __m256i s[TQ_ROWS][TQ2_ACC];
        for (int r = 0; r < TQ_ROWS; r++)
            for (int a = 0; a < TQ2_ACC; a++) s[r][a] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * h));
            for (int n = 0; n < 4; n++) {
                const __m256i c = _mm256_and_si256(_mm256_srli_epi16(q, 2 * n), mask);
                for (int r = 0; r < R; r++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(y[r][b].qs + 128 * h + 32 * n));
#if TQ2_VNNI
                    s[r][n % TQ2_ACC] = _mm256_dpbusd_epi32(s[r][n % TQ2_ACC], c, v);
#else
                    s[r][0] = _mm256_add_epi16(s[r][0], _mm256_maddubs_epi16(c, v));
#endif
                }
            }
        }
        const float dw = half_table[w[b].d];
        for (int r = 0; r < R; r++) {
#if TQ2_VNNI
            const __m256i lanes = TQ2_NAME(tq2_acc_sum)(s[r]);
#else
            const __m256i lanes = _mm256_madd_epi16(s[r][0], ones);
#endif
            /* the block's integer: the 8 lanes summed (exact), less the "-1" */
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
            const int32_t isum = _mm_cvtsi128_si32(t) - y[r][b].bsum;
            acc[r] = acc[r] + (float)isum * (y[r][b].d * dw);
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
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

/* R (1..TQ_ROWS) activation rows against a group's 8 rows in tiles: out[r][i] for weight
 * row i. Each piece's codes are unpacked once for the R rows; a row's integers sit in its
 * lane (AVX2: int16 pairs per half block, 8 pieces x 4 shifts x 2 products x 3 x 127 <
 * 2^15, then madd to int32). */
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_tile)(const uint8_t *tiles, const block_q8k *const *y,
                                                                    const int R, int64_t nb,
                                                                    float out[][8]) TQ2_TARGET;
static inline __attribute__((always_inline)) void TQ2_NAME(tq2_tile)(const uint8_t *tiles, const block_q8k *const *y,
                                                                    const int R, int64_t nb, float out[][8]) {
    const __m256i mask = _mm256_set1_epi8(3);
#if !TQ2_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[TQ_ROWS];
    for (int r = 0; r < TQ_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *tile = tiles + b * TQ2_TILE;
        __m256i s[TQ_ROWS][TQ2_ACC];
        for (int r = 0; r < TQ_ROWS; r++)
            for (int a = 0; a < TQ2_ACC; a++) s[r][a] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
#if !TQ2_VNNI
            __m256i s16[TQ_ROWS];
            for (int r = 0; r < TQ_ROWS; r++) s16[r] = _mm256_setzero_si256();
#endif
            for (int k = 0; k < 8; k++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(tile + 16 + 32 * (8 * h + k)));
                for (int n = 0; n < 4; n++) {
                    const __m256i c = _mm256_and_si256(_mm256_srli_epi16(q, 2 * n), mask);
                    for (int r = 0; r < R; r++) {
                        const __m256i v = bcast4(y[r][b].qs + 128 * h + 32 * n + 4 * k);
#if TQ2_VNNI
                        s[r][n % TQ2_ACC] = _mm256_dpbusd_epi32(s[r][n % TQ2_ACC], c, v);
#else
                        s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(c, v));
#endif
                    }
                }
            }
#if !TQ2_VNNI
            for (int r = 0; r < R; r++) s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(s16[r], ones));
#endif
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tile));
        for (int r = 0; r < R; r++) {
            const __m256i lanes = TQ2_NAME(tq2_acc_sum)(s[r]);
            const __m256i isum = _mm256_sub_epi32(lanes, _mm256_set1_epi32(y[r][b].bsum));
            const __m256 d = _mm256_mul_ps(_mm256_set1_ps(y[r][b].d), dw);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(isum), d));
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out[r], acc[r]);
}

static void TQ2_NAME(tq2_tiles)(const uint8_t *tiles, const block_q8k *const *y, int R, int64_t nb,
                                float out[][8]) TQ2_TARGET;
static void TQ2_NAME(tq2_tiles)(const uint8_t *tiles, const block_q8k *const *y, int R, int64_t nb,
                                float out[][8]) {
    switch (R) {
    case 1: TQ2_NAME(tq2_tile)(tiles, y, 1, nb, out); break;
    case 2: TQ2_NAME(tq2_tile)(tiles, y, 2, nb, out); break;
    case 3: TQ2_NAME(tq2_tile)(tiles, y, 3, nb, out); break;
    default: TQ2_NAME(tq2_tile)(tiles, y, TQ_ROWS, nb, out); break;
    }
}

#undef TQ2_ACC
