/* The x8 tile loops, included twice by kernels_x8.h: once for AVX2's maddubs + madd
 * (X8_VNNI 0) and once for AVX-512 VNNI's vpdpbusd on 256-bit registers (X8_VNNI 1),
 * each copy compiled for its own instruction set (X8_TARGET) under its own names
 * (X8_NAME). Both sum the same int8 x int8 products exactly in int32, so the two paths
 * give the same bits: the maddubs pair sums never saturate for these formats (Q4 pairs
 * reach 2*15*127, Q8_0 pairs 2*127*127, both inside int16).
 *
 * Why a second copy: one vpdpbusd does a maddubs, a madd and the add into the
 * accumulator, so a Q4_0 tile takes 8 multiply instructions per activation row instead
 * of 16, which is what a batched decode step (many rows against each tile) is bound by. */

/* 8 rows' sums of one block against one activation block, lane r = row r. */
/* The unsigned 4-bit products, less Q4_0's offset 8 (offset 0: Q4_1). */
X8_TARGET static inline __attribute__((always_inline)) __m256i X8_NAME(tile_dot_q4)(const __m256i w[8],
                                                                                  const block_x8 *x, int offset) {
    /* w[k] holds elements 4k..4k+3 (k < 4) or 16+4(k-4).. (k >= 4) of each row, unsigned */
#if X8_VNNI
    /* two accumulators: each vpdpbusd waits for the previous one into the same register */
    __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], bcast4(x->qs));
    __m256i b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[1], bcast4(x->qs + 4));
    for (int k = 2; k < 8; k += 2) {
        a = _mm256_dpbusd_epi32(a, w[k], bcast4(x->qs + 4 * k));
        b = _mm256_dpbusd_epi32(b, w[k + 1], bcast4(x->qs + 4 * k + 4));
    }
    __m256i s32 = _mm256_add_epi32(a, b);
#else
    /* 8 pair sums of at most 2*15*127 stay inside int16 */
    __m256i s16 = _mm256_maddubs_epi16(w[0], bcast4(x->qs));
    for (int k = 1; k < 8; k++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[k], bcast4(x->qs + 4 * k)));
    __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
    return offset ? _mm256_sub_epi32(s32, _mm256_set1_epi32(offset * x->isum)) : s32; /* (q - 8) */
}

X8_TARGET static inline __attribute__((always_inline)) __m256i X8_NAME(tile_dot_q8_0)(const __m256i w[8],
                                                                                    const __m256i aw[8],
                                                                                    const block_x8 *x) {
    /* signed x signed: |w| times x carrying w's sign */
#if X8_VNNI
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int k = 0; k < 8; k += 2) {
        a = _mm256_dpbusd_epi32(a, aw[k], _mm256_sign_epi8(bcast4(x->qs + 4 * k), w[k]));
        b = _mm256_dpbusd_epi32(b, aw[k + 1], _mm256_sign_epi8(bcast4(x->qs + 4 * k + 4), w[k + 1]));
    }
    return _mm256_add_epi32(a, b);
#else
    /* pair sums reach 2*127*127, so each piece widens to int32 before the next is added */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s32 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        __m256i p16 = _mm256_maddubs_epi16(aw[k], _mm256_sign_epi8(bcast4(x->qs + 4 * k), w[k]));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p16, ones));
    }
    return s32;
#endif
}

X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(gemv_group_x8)(
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
            __m256i s = type == T_Q8_0   ? X8_NAME(tile_dot_q8_0)(w, aw, x)
                        : type == T_Q4_0 ? X8_NAME(tile_dot_q4)(w, x, 8)
                                         : X8_NAME(tile_dot_q4)(w, x, 0);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x->d)), _mm256_cvtepi32_ps(s), acc[r]);
            if (type == T_Q4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x->s), acc[r]); /* + m * sum x */
        }
    }
    for (int64_t r = 0; r < M; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

/* Groups g0..g1 against all M activation rows, MAX_ROWS rows at a time: a group's tiles
 * (8 rows x K) stay in cache while every row chunk passes, so a prompt reads the weights
 * from memory once, and each row's result is the decode kernel's, bit for bit. */
X8_TARGET static void X8_NAME(gemv_groups_x8)(int type, const uint8_t *W, size_t group_bytes, int64_t g0,
                                              int64_t g1, int64_t nb, const block_x8 *xq, int64_t M, int64_t N,
                                              float *y) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *tiles = W + g * group_bytes;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t m = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            const block_x8 *x = xq + r0 * nb;
            float *out = y + r0 * N + X8 * g;
            /* constant type and row count: each call site compiles its own loop */
            if (type == T_Q4_0)
                m == 1 ? X8_NAME(gemv_group_x8)(T_Q4_0, tiles, nb, x, 1, N, out)
                       : X8_NAME(gemv_group_x8)(T_Q4_0, tiles, nb, x, m, N, out);
            else if (type == T_Q4_1)
                m == 1 ? X8_NAME(gemv_group_x8)(T_Q4_1, tiles, nb, x, 1, N, out)
                       : X8_NAME(gemv_group_x8)(T_Q4_1, tiles, nb, x, m, N, out);
            else
                m == 1 ? X8_NAME(gemv_group_x8)(T_Q8_0, tiles, nb, x, 1, N, out)
                       : X8_NAME(gemv_group_x8)(T_Q8_0, tiles, nb, x, m, N, out);
        }
    }
}
