/* The Q4_K / Q5_K / Q6_K x8 tile loops, included twice by kernels_kq_x8.h: AVX2's maddubs +
 * madd (X8_VNNI 0) and AVX-512 VNNI's vpdpbusd (X8_VNNI 1), each compiled for its own
 * instruction set (X8_TARGET) under its own names (X8_NAME). Both sum the same products
 * exactly in int32: 8 maddubs pair sums of 4-bit x int8 reach 8 * 2 * 15 * 127, 4 of
 * 5-bit 4 * 2 * 31 * 127, 2 of 6-bit 2 * 2 * 63 * 127, inside int16. */

/* 8 rows (one group) against M activation rows, lane r = weight row r. */
/* Piece k of chunk c, 8 rows: sub-block 2c's values 4k..4k+3 (ul) and 2c+1's (uh), as
 * unsigned bytes; Q5_K adds qh's bit 2c / 2c+1 as the fifth bit. */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(q45_piece)(
    int q5, const uint8_t *qs, const uint8_t *qh, int c, int k, __m256i *ul, __m256i *uh) {
    const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + 32 * (8 * c + k)));
    *ul = _mm256_and_si256(w, low4);
    *uh = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
    if (q5) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(qh + 32 * k));
        *ul = _mm256_or_si256(*ul, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * c), one), 4));
        *uh = _mm256_or_si256(*uh, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * c + 1), one), 4));
    }
}

/* Piece k of ql[64h..] / ql[64h+32..] / qh[32h..] (96 bytes, see kq_group_q6_K): the 6-bit
 * values of the four 32-value runs 128h + 32j, as unsigned bytes u[j]. */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(q6_piece)(const uint8_t *piece, __m256i *u) {
    const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)piece);
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(piece + 32));
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(piece + 64));
    u[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
    u[1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4));
    u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), low2), 4));
    u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), low2), 4));
}

/* R activation rows (R <= KQ_X8_ROWS) against one super-block's tile: each piece is
 * unpacked once and serves the R rows, where a one-row loop unpacked it for every row
 * (a prompt's GEMM was bound by the unpacking). The integer sums are exact whatever the
 * grouping and the float step is kq_step's, so every row gets the row kernel's bits. */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(q45_rows)(
    int q5, const int R, const uint8_t *qs, const uint8_t *qh, const __m256i *s, const __m256i *m,
    __m256 d, __m256 dmin, const block_q8_K *const *x, __m256 *acc) {
    __m256i sumi[KQ_X8_ROWS];
    for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        __m256i lo[KQ_X8_ROWS], hi[KQ_X8_ROWS];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_si256();
#if !X8_VNNI
        /* Q4 pair sums reach 2 * 15 * 127: 8 pieces fit int16; Q5's 2 * 31 * 127: 4 */
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i lo16[KQ_X8_ROWS], hi16[KQ_X8_ROWS];
        for (int r = 0; r < R; r++) lo16[r] = hi16[r] = _mm256_setzero_si256();
#endif
        for (int k = 0; k < 8; k++) {
            __m256i ul, uh;
            X8_NAME(q45_piece)(q5, qs, qh, c, k, &ul, &uh);
            for (int r = 0; r < R; r++) {
                const int8_t *xl = x[r]->qs + 64 * c;
#if X8_VNNI
                lo[r] = _mm256_dpbusd_epi32(lo[r], ul, bcast4(xl + 4 * k));
                hi[r] = _mm256_dpbusd_epi32(hi[r], uh, bcast4(xl + 32 + 4 * k));
#else
                lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(ul, bcast4(xl + 4 * k)));
                hi16[r] = _mm256_add_epi16(hi16[r], _mm256_maddubs_epi16(uh, bcast4(xl + 32 + 4 * k)));
                if (k == 7 || (q5 && k == 3)) {
                    lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(lo16[r], ones));
                    hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(hi16[r], ones));
                    lo16[r] = hi16[r] = _mm256_setzero_si256();
                }
#endif
            }
        }
        for (int r = 0; r < R; r++)
            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(_mm256_mullo_epi32(lo[r], s[2 * c]),
                                                                 _mm256_mullo_epi32(hi[r], s[2 * c + 1])));
    }
    for (int r = 0; r < R; r++) {
        __m256i summ = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i bsum = _mm256_set1_epi32(x[r]->bsums[2 * j] + x[r]->bsums[2 * j + 1]);
            summ = _mm256_add_epi32(summ, _mm256_mullo_epi32(m[j], bsum));
        }
        const __m256 dx = _mm256_set1_ps(x[r]->d);
        const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sumi[r])),
                                       _mm256_mul_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(summ)));
        acc[r] = _mm256_add_ps(acc[r], t);
    }
}

#if X8_VNNI
/* Q6_K's counterpart of q45_rows (VNNI: AVX2's int16 pair sums would need twice the
 * registers a row): the pieces' 6-bit values unpacked once for R rows. */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(q6_rows)(
    const int R, const uint8_t *quants, const __m256i *s, __m256 d, const block_q8_K *const *x, __m256 *acc) {
    const __m256 zero = _mm256_setzero_ps();
    __m256i sumi[KQ_X8_ROWS];
    for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        for (int half = 0; half < 2; half++) {
            __m256i dot[KQ_X8_ROWS][4];
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 4; j++) dot[r][j] = _mm256_setzero_si256();
            for (int k = 4 * half; k < 4 * half + 4; k++) {
                __m256i u[4];
                X8_NAME(q6_piece)(quants + 96 * (8 * h + k), u);
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < 4; j++)
                        dot[r][j] = _mm256_dpbusd_epi32(dot[r][j], u[j], bcast4(x[r]->qs + 128 * h + 32 * j + 4 * k));
            }
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 4; j++) {
                    const int g = 8 * h + 2 * j + half;
                    const __m256i t = _mm256_sub_epi32(dot[r][j], _mm256_set1_epi32(32 * x[r]->bsums[g]));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_mullo_epi32(t, s[g]));
                }
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256 dx = _mm256_set1_ps(x[r]->d);
        const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sumi[r])),
                                       _mm256_mul_ps(_mm256_mul_ps(zero, dx), zero));
        acc[r] = _mm256_add_ps(acc[r], t);
    }
}

#endif

/* Q4_K, or Q5_K (q5: the fifth bit of value l of sub-block j is bit j of qh[l]). */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(kq_group_q45_K)(
    int q5, const uint8_t *tiles, int64_t nb, const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    __m256 acc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
    const __m256i byte = _mm256_set1_epi32(0xff);
    const __m256i six = _mm256_set1_epi32(0x3f3f3f3f), four = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i top2 = _mm256_set1_epi32(0x30303030);
    const size_t tile_size = X8 * (q5 ? sizeof(block_q5_K) : sizeof(block_q4_K));
    for (int64_t b = 0; b < nb; b++, tiles += tile_size) {
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
        const uint8_t *qh = tiles + 128, *qs = tiles + (q5 ? 384 : 128);
#define KQ_Q45(R) X8_NAME(q45_rows)(q5, R, qs, qh, s, m, d, dmin, xr, acc + r0)
        KQ_X8_ALL_ROWS(M, X8_ROWS, KQ_Q45);
#undef KQ_Q45
    }
    for (int64_t r = 0; r < M; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

/* Q6_K: 16 groups of 16 values with int8 scales, u = ql nibble | 2 qh bits << 4, offset
 * 32. Piece k of ql[64h..] / ql[64h+32..] / qh[32h..] holds values 4k..4k+3 of the four
 * 32-value runs 128h + 32j (j = 0..3: ql0 low, ql1 low, ql0 high, ql1 high; qh bits 2j). */
X8_TARGET static inline __attribute__((always_inline)) void X8_NAME(kq_group_q6_K)(
    const uint8_t *tiles, int64_t nb, const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    __m256 acc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
#if !X8_VNNI
    const __m256 zero = _mm256_setzero_ps();
#endif
    for (int64_t b = 0; b < nb; b++, tiles += X8 * sizeof(block_q6_K)) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tiles));
        __m256i s[16]; /* group g's int8 scale of each row, sign-extended */
        for (int w = 0; w < 4; w++) {
            const __m256i word = _mm256_loadu_si256((const __m256i *)(tiles + 16 + 32 * w));
            s[4 * w + 0] = _mm256_srai_epi32(_mm256_slli_epi32(word, 24), 24);
            s[4 * w + 1] = _mm256_srai_epi32(_mm256_slli_epi32(word, 16), 24);
            s[4 * w + 2] = _mm256_srai_epi32(_mm256_slli_epi32(word, 8), 24);
            s[4 * w + 3] = _mm256_srai_epi32(word, 24);
        }
        const uint8_t *quants = tiles + 144; /* (ql, ql, qh) pieces of p = 8h + k, 96 B each */
#if X8_VNNI
#define KQ_Q6(R) X8_NAME(q6_rows)(R, quants, s, d, xr, acc + r0)
        KQ_X8_ALL_ROWS(M, X8_ROWS, KQ_Q6);
#undef KQ_Q6
#else
        for (int64_t r = 0; r < M; r++) {
            const block_q8_K *x = xq + r * nb + b;
            __m256i sumi = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {
                for (int half = 0; half < 2; half++) { /* pieces 4 half .. 4 half + 3: one group per run */
                    __m256i dot[4];
                    for (int j = 0; j < 4; j++) dot[j] = _mm256_setzero_si256();
                    __m256i p16[4] = {0}; /* set at even pieces, read at odd ones */
                    for (int k = 4 * half; k < 4 * half + 4; k++) {
                        __m256i u[4];
                        X8_NAME(q6_piece)(quants + 96 * (8 * h + k), u);
                        for (int j = 0; j < 4; j++) {
                            const __m256i xv = bcast4(x->qs + 128 * h + 32 * j + 4 * k);
                            /* two pieces' pair sums (2 * 2 * 63 * 127) still fit int16 */
                            const __m256i p = _mm256_maddubs_epi16(u[j], xv);
                            if (k % 2 == 0) {
                                p16[j] = p;
                            } else {
                                dot[j] = _mm256_add_epi32(
                                    dot[j], _mm256_madd_epi16(_mm256_add_epi16(p16[j], p), _mm256_set1_epi16(1)));
                            }
                        }
                    }
                    for (int j = 0; j < 4; j++) {
                        const int g = 8 * h + 2 * j + half;
                        const __m256i t = _mm256_sub_epi32(dot[j], _mm256_set1_epi32(32 * x->bsums[g]));
                        sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(t, s[g]));
                    }
                }
            }
            /* kq_step, lane by lane, with Q6_K's zero dmin and summ as the row kernel has them */
            const __m256 dx = _mm256_set1_ps(x->d);
            const __m256 t = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sumi)),
                                           _mm256_mul_ps(_mm256_mul_ps(zero, dx), zero));
            acc[r] = _mm256_add_ps(acc[r], t);
        }
#endif
    }
    for (int64_t r = 0; r < M; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

/* Groups g0..g1 against all M activation rows, MAX_ROWS rows at a time: a group's tiles
 * stay in cache while every row chunk passes (a prompt reads the weights once). */
X8_TARGET static void X8_NAME(kq_groups_x8)(int type, const uint8_t *W, size_t group_bytes, int64_t g0,
                                            int64_t g1, int64_t nb, const block_q8_K *xq, int64_t M, int64_t N,
                                            float *y) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *tiles = W + g * group_bytes;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t m = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            const block_q8_K *x = xq + r0 * nb;
            float *out = y + r0 * N + X8 * g;
            /* a constant row count for the decode step: its loop compiles on its own */
            if (type == T_Q4_K)
                m == 1 ? X8_NAME(kq_group_q45_K)(0, tiles, nb, x, 1, N, out)
                       : X8_NAME(kq_group_q45_K)(0, tiles, nb, x, m, N, out);
            else if (type == T_Q5_K)
                m == 1 ? X8_NAME(kq_group_q45_K)(1, tiles, nb, x, 1, N, out)
                       : X8_NAME(kq_group_q45_K)(1, tiles, nb, x, m, N, out);
            else
                m == 1 ? X8_NAME(kq_group_q6_K)(tiles, nb, x, 1, N, out)
                       : X8_NAME(kq_group_q6_K)(tiles, nb, x, m, N, out);
        }
    }
}
