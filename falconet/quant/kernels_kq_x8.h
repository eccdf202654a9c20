/* Q4_K, Q5_K and Q6_K in interleaved 8-row tiles (kq x8). Included once by _kernels.c, after
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

/* A tile is runs of pieces, each run one field of the block: (offset in the block,
 * bytes per piece, pieces, stride of the source); piece i of row r lands at the run's
 * start + (8i + r) * bytes. Q6_K's quants go in the order the kernel reads them (the
 * prefetchers follow a tile read front to back; three interleaved streams per tile
 * halved the bandwidth): per p = 8h + k, ql piece 16h + k, ql piece 16h + 8 + k, qh
 * piece 8h + k, one run each.
 *   Q4_K: d | dmin | scales as 3 words | qs as 32 pieces         (offsets 0, 16, 32, 128)
 *   Q5_K: as Q4_K with qh's 8 pieces before qs (read once, then from L1)  (.., 128, 384)
 *   Q6_K: d | scales as 4 words | (ql, ql, qh) x 16              (offsets 0, 16, 144) */
typedef struct { int from, bytes, pieces; } kq_run;
static const kq_run KQ_X8_Q4_K[] = {{0, 2, 1}, {2, 2, 1}, {4, 4, 3}, {16, 4, 32}, {0, 0, 0}};
static const kq_run KQ_X8_Q5_K[] = {{0, 2, 1}, {2, 2, 1}, {4, 4, 3}, {16, 4, 8}, {48, 4, 32}, {0, 0, 0}};
static kq_run KQ_X8_Q6_K[2 + 48 + 1] = {{208, 2, 1}, {192, 4, 4}}; /* the rest: kq_x8_init */

static void kq_x8_init(void) {
    for (int p = 0; p < 16; p++) {
        const int h = p / 8, k = p % 8;
        KQ_X8_Q6_K[2 + 3 * p] = (kq_run){4 * (16 * h + k), 4, 1};
        KQ_X8_Q6_K[3 + 3 * p] = (kq_run){4 * (16 * h + 8 + k), 4, 1};
        KQ_X8_Q6_K[4 + 3 * p] = (kq_run){128 + 4 * (8 * h + k), 4, 1};
    }
}

static int kq_x8_type(int type) { return type == T_Q4_K || type == T_Q5_K || type == T_Q6_K; }

/* K-quant rows [N, nb blocks] -> kq x8 tiles, or back (to_x8 = 0). N % 8 == 0. */
static void kq_repack(int type, const uint8_t *src, uint8_t *dst, int64_t N, int64_t nb, int to_x8) {
    const size_t bb = kq_block_bytes(type), row_bytes = (size_t)nb * bb;
    const kq_run *runs = type == T_Q4_K ? KQ_X8_Q4_K : type == T_Q5_K ? KQ_X8_Q5_K : KQ_X8_Q6_K;
    for (int64_t g = 0; g < N / X8; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *tile = (uint8_t *)(to_x8 ? dst : src) + g * X8 * row_bytes + b * X8 * bb;
            for (int r = 0; r < X8; r++) {
                uint8_t *block = (uint8_t *)(to_x8 ? src : dst) + (g * X8 + r) * row_bytes + b * bb;
                size_t start = 0;
                for (const kq_run *run = runs; run->bytes; start += (size_t)X8 * run->bytes * run->pieces, run++) {
                    for (int i = 0; i < run->pieces; i++) {
                        uint8_t *at = tile + start + ((size_t)X8 * i + r) * run->bytes;
                        uint8_t *from = block + run->from + i * run->bytes;
                        if (to_x8) memcpy(at, from, run->bytes); else memcpy(from, at, run->bytes);
                    }
                }
            }
        }
    }
}

/* Activation rows per pass through a tile (kernels_kq_x8_tiles.h): at most KQ_X8_ROWS,
 * X8_ROWS per instruction set (VNNI 4; AVX2 2: its int16 pair sums take twice the
 * registers, and 4 rows spilled). */
#define KQ_X8_ROWS 4

/* Every activation row (0..M-1) of super-block b through CALL(R): ROWS rows at a time,
 * then the 1-3 left, R a constant each time so that each count compiles to its own
 * unrolled loop. CALL sees r0 (its first row) and xr (its rows' Q8_K blocks). */
#define KQ_X8_ALL_ROWS(M, ROWS, CALL)                                                     \
    do {                                                                            \
        int64_t r0 = 0;                                                             \
        for (; r0 + (ROWS) <= (M); r0 += (ROWS)) {                                  \
            const block_q8_K *xr[KQ_X8_ROWS];                                       \
            for (int i = 0; i < (ROWS); i++) xr[i] = xq + (r0 + i) * nb + b;        \
            CALL(ROWS);                                                             \
        }                                                                           \
        const block_q8_K *xr[KQ_X8_ROWS];                                           \
        for (int i = 0; r0 + i < (M); i++) xr[i] = xq + (r0 + i) * nb + b;          \
        switch ((M) - r0) {                                                         \
        case 3: CALL(3); break;                                                     \
        case 2: CALL(2); break;                                                     \
        case 1: CALL(1); break;                                                     \
        default: break;                                                             \
        }                                                                           \
    } while (0)

#if HAVE_X86
/* The tile loops: AVX2's, and AVX-512 VNNI's where the CPU has it (same bits). */
#define X8_TARGET AVX2
#define X8_VNNI 0
#define X8_ROWS 2
#define X8_NAME(f) f##_avx2
#include "kernels_kq_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_ROWS
#undef X8_NAME
#define X8_TARGET VNNI
#define X8_VNNI 1
#define X8_ROWS 4
#define X8_NAME(f) f##_vnni
#include "kernels_kq_x8_tiles.h"
#undef X8_TARGET
#undef X8_VNNI
#undef X8_ROWS
#undef X8_NAME

/* y[M, N] = x[M, K] @ W.T for Q4_K / Q5_K / Q6_K weights in kq x8 tiles, any M: kq_gemm's
 * activation rounding and schedule, 8 weight rows per unit of work. Returns -1 when the
 * activation buffer cannot be allocated. */
static int kq_gemm_x8(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M, float *y,
                      int threads) {
    const int64_t nb = K / QK_K, groups = N / X8;
    const size_t group_bytes = (size_t)X8 * nb * kq_block_bytes(type);
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
        (use_vnni ? kq_groups_x8_vnni : kq_groups_x8_avx2)(type, W, group_bytes, g0, g1, nb, xq, M, N, y);
    }
    free(xq);
    return 0;
}
#endif
