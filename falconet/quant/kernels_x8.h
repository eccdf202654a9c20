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

/* The tile loops: AVX2's, and AVX-512 VNNI's where the CPU has it (same bits). */
#define X8_TARGET AVX2
#define X8_VNNI 0
#define X8_NAME(f) f##_avx2
#include "kernels_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_NAME
#define X8_TARGET VNNI
#define X8_VNNI 1
#define X8_NAME(f) f##_vnni
#include "kernels_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_NAME

static void gemv_groups_x8(int type, const uint8_t *W, size_t group_bytes, int64_t g0, int64_t g1, int64_t nb,
                           const block_x8 *xq, int64_t M, int64_t N, float *y) {
    (use_vnni ? gemv_groups_x8_vnni : gemv_groups_x8_avx2)(type, W, group_bytes, g0, g1, nb, xq, M, N, y);
}
#endif
