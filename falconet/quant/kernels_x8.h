/* Interleaved-rows (x8) layout and kernels. Included once by _kernels.c. */
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
