/* The Q4_K x8 tile loops, included twice by kernels_kq_x8.h: AVX2's maddubs + madd
 * (X8_VNNI 0) and AVX-512 VNNI's vpdpbusd (X8_VNNI 1), each compiled for its own
 * instruction set (X8_TARGET) under its own names (X8_NAME). Both sum the same products
 * exactly in int32: 8 maddubs pair sums of 4-bit x int8 reach 8 * 2 * 15 * 127, inside
 * int16. */

/* 8 rows (one group) against M activation rows, lane r = weight row r. */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(kq_group_x8)(
    const uint8_t *tiles, int64_t nb, const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    __m256 acc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(15), byte = _mm256_set1_epi32(0xff);
    const __m256i six = _mm256_set1_epi32(0x3f3f3f3f), four = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i top2 = _mm256_set1_epi32(0x30303030);
    for (int64_t b = 0; b < nb; b++, tiles += X8 * sizeof(block_q4_K)) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tiles));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tiles + 16)));
        /* scale_min_k4 for 8 rows at once (see kq_load): byte j of sc_lo / mn_lo is
         * sub-block j's scale / min (j < 4), of sc_hi / mn_hi sub-block 4 + j's */
        const __m256i a = _mm256_loadu_si256((const __m256i *)(tiles + 32));
        const __m256i bw = _mm256_loadu_si256((const __m256i *)(tiles + 64));
        const __m256i cw = _mm256_loadu_si256((const __m256i *)(tiles + 96));
        const __m256i sc_lo = _mm256_and_si256(a, six), mn_lo = _mm256_and_si256(bw, six);
        const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(cw, four),
                                              _mm256_and_si256(_mm256_srli_epi32(a, 2), top2));
        const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(cw, 4), four),
                                              _mm256_and_si256(_mm256_srli_epi32(bw, 2), top2));
        __m256i s[8], m[8];
        for (int j = 0; j < 4; j++) {
            s[j] = _mm256_and_si256(_mm256_srli_epi32(sc_lo, 8 * j), byte);
            s[j + 4] = _mm256_and_si256(_mm256_srli_epi32(sc_hi, 8 * j), byte);
            m[j] = _mm256_and_si256(_mm256_srli_epi32(mn_lo, 8 * j), byte);
            m[j + 4] = _mm256_and_si256(_mm256_srli_epi32(mn_hi, 8 * j), byte);
        }
        const uint8_t *qs = tiles + 128;
        for (int64_t r = 0; r < M; r++) {
            const block_q8_K *x = xq + r * nb + b;
            __m256i sumi = _mm256_setzero_si256(), summ = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const int8_t *xl = x->qs + 64 * c, *xh = xl + 32;
#if X8_VNNI
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                for (int k = 0; k < 8; k++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + 32 * (8 * c + k)));
                    lo = _mm256_dpbusd_epi32(lo, _mm256_and_si256(w, low4), bcast4(xl + 4 * k));
                    hi = _mm256_dpbusd_epi32(hi, _mm256_and_si256(_mm256_srli_epi16(w, 4), low4), bcast4(xh + 4 * k));
                }
#else
                __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
                for (int k = 0; k < 8; k++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + 32 * (8 * c + k)));
                    lo16 = _mm256_add_epi16(lo16, _mm256_maddubs_epi16(_mm256_and_si256(w, low4), bcast4(xl + 4 * k)));
                    hi16 = _mm256_add_epi16(
                        hi16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), low4), bcast4(xh + 4 * k)));
                }
                const __m256i ones = _mm256_set1_epi16(1);
                const __m256i lo = _mm256_madd_epi16(lo16, ones), hi = _mm256_madd_epi16(hi16, ones);
#endif
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_mullo_epi32(lo, s[2 * c]),
                                                               _mm256_mullo_epi32(hi, s[2 * c + 1])));
            }
            for (int j = 0; j < 8; j++) {
                const __m256i bsum = _mm256_set1_epi32(x->bsums[2 * j] + x->bsums[2 * j + 1]);
                summ = _mm256_add_epi32(summ, _mm256_mullo_epi32(m[j], bsum));
            }
            /* kq_step, lane by lane: acc + ((d * dx) * sumi - (dmin * dx) * summ) */
            const __m256 dx = _mm256_set1_ps(x->d);
            const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sumi)),
                                           _mm256_mul_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(summ)));
            acc[r] = _mm256_add_ps(acc[r], t);
        }
    }
    for (int64_t r = 0; r < M; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

/* Groups g0..g1 against all M activation rows, MAX_ROWS rows at a time: a group's tiles
 * stay in cache while every row chunk passes (a prompt reads the weights once). */
X8_TARGET static void X8_NAME(kq_groups_x8)(const uint8_t *W, size_t group_bytes, int64_t g0, int64_t g1,
                                            int64_t nb, const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *tiles = W + g * group_bytes;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t m = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            const block_q8_K *x = xq + r0 * nb;
            float *out = y + r0 * N + X8 * g;
            /* a constant row count for the decode step: its loop compiles on its own */
            m == 1 ? X8_NAME(kq_group_x8)(tiles, nb, x, 1, N, out) : X8_NAME(kq_group_x8)(tiles, nb, x, m, N, out);
        }
    }
}
