/* Q4_K in interleaved 8-row tiles (kq x8). Included once by _kernels.c, after
 * kernels_kquants.h (Q8_K activations, kq_step, the row schedule) and kernels_x8.h.
 *
 * The row-major K-quant kernel spends most of a decode step's instructions outside the
 * integer products: unpacking each row's 6-bit scales and mins, a horizontal sum and a
 * scalar float step per row and super-block. As for Q4_0 (kernels_x8.h), reordering the
 * bytes of each group of 8 output rows lets one instruction serve the 8 rows, each in
 * its own 32-bit lane. Per super-block b a tile (8 x 144 B, a permutation of the 8
 * rows' blocks, so repacking keeps the size and is done once at the first CPU forward):
 *
 *   d[8] fp16 | dmin[8] fp16 | scales[0..3] of rows 0..7 | scales[4..7] ... | scales[8..11] ...
 *   | qs[4p..4p+3] of rows 0..7, p = 0..31
 *
 * qs byte l of chunk c (l < 32) holds value 64c + l in its low nibble and 64c + 32 + l in
 * its high one, so piece p = 8c + k gives sub-block 2c's values 4k..4k+3 (low nibbles)
 * and sub-block 2c+1's (high). With 4 activation values broadcast to every lane, the
 * products land in each row's lane; the 12 scale bytes, read as three 32-bit words per
 * row, unpack for all 8 rows in a handful of vector operations. The integers are the
 * row kernel's (exact) and the float step is kq_step's, operation for operation in
 * vector lanes (no FMA: -ffp-contract=off), so the results equal the row kernel's bit
 * for bit, and any batch equals its rows alone.
 */

#define KQ_X8_PIECES 32 /* 4-byte pieces of qs per row and super-block */

/* Q4_K rows [N, nb blocks] -> kq x8 tiles, or back (to_x8 = 0). N % 8 == 0. */
static void kq_repack(const uint8_t *src, uint8_t *dst, int64_t N, int64_t nb, int to_x8) {
    const size_t bb = sizeof(block_q4_K), row_bytes = (size_t)nb * bb;
    for (int64_t g = 0; g < N / X8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *tile = (uint8_t *)(to_x8 ? dst : src) + g * X8 * row_bytes + b * X8 * bb;
            for (int r = 0; r < X8; r++) {
                uint8_t *block = (uint8_t *)(to_x8 ? src : dst) + (g * X8 + r) * row_bytes + b * bb;
                /* (tile offset, block offset, bytes): d, dmin, the three scale words, qs */
                for (int f = 0; f < 5 + KQ_X8_PIECES; f++) {
                    size_t at, from, n;
                    if (f < 2) {
                        at = 16 * f + 2 * r, from = 2 * f, n = 2;
                    } else if (f < 5) {
                        at = 32 + 32 * (f - 2) + 4 * r, from = 4 + 4 * (f - 2), n = 4;
                    } else {
                        at = 128 + 32 * (f - 5) + 4 * r, from = 16 + 4 * (f - 5), n = 4;
                    }
                    if (to_x8) memcpy(tile + at, block + from, n); else memcpy(block + from, tile + at, n);
                }
            }
        }
    }
}

#if HAVE_X86
/* The tile loops: AVX2's, and AVX-512 VNNI's where the CPU has it (same bits). */
#define X8_TARGET AVX2
#define X8_VNNI 0
#define X8_NAME(f) f##_avx2
#include "kernels_kq_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_NAME
#define X8_TARGET VNNI
#define X8_VNNI 1
#define X8_NAME(f) f##_vnni
#include "kernels_kq_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_NAME

/* y[M, N] = x[M, K] @ W.T for Q4_K weights in kq x8 tiles, any M: kq_gemm's activation
 * rounding and schedule, 8 weight rows per unit of work. Returns -1 when the activation
 * buffer cannot be allocated. */
static int kq_gemm_x8(const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M, float *y, int threads) {
    const int64_t nb = K / QK_K, groups = N / X8;
    const size_t group_bytes = (size_t)X8 * nb * sizeof(block_q4_K);
    block_q8_K *xq = malloc(sizeof(block_q8_K) * (size_t)(M * nb > 0 ? M * nb : 1));
    if (!xq) return -1;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 4)
    for (int64_t r = 0; r < M; r++) quantize_q8_K_avx2(x + r * K, xq + r * nb, nb);
    /* contiguous runs of groups handed out as threads free up (see gemv_x8) */
    int64_t per = groups / ((int64_t)threads * X8_UNITS_PER_THREAD);
    per = per < ROW_CHUNK / X8 ? ROW_CHUNK / X8 : per;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_units(groups, per); c++) {
        int64_t g0, g1;
        unit_bounds(c, groups, per, &g0, &g1);
        (use_vnni ? kq_groups_x8_vnni : kq_groups_x8_avx2)(W, group_bytes, g0, g1, nb, xq, M, N, y);
    }
    free(xq);
    return 0;
}
#endif
