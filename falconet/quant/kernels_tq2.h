/* llama.cpp's TQ2_0 blocks as they lie in a GGUF file, multiplied without unpacking them
 * to floats: y[M, N] = x[M, K] @ W.T. Included once by _kernels.c.
 *
 * A TQ2_0 row is K/256 blocks of 66 bytes: qs[64], then d (fp16). Byte j of half h
 * (qs[32h + j]) holds the codes q = w + 1 in {0, 1, 2} of values 128h + 32n + j at bits
 * 2n..2n+1, so one 32-byte load, shifted by 2n and masked, gives the codes of 32
 * consecutive values -- the layout is already SIMD-shaped and the kernel reads the
 * file's bytes as they are.
 *
 * The activations are rounded per 256 values to int8 as llama.cpp's Q8_K does
 * (iscale = -127 / max, the signed value of largest magnitude; q = min(127, round(x *
 * iscale)); d = 1 / iscale), so the products are those llama.cpp computes for the file:
 *
 *   y[m, n] = sum_b  d_x[m, b] * d_w[n, b] * (sum_k q_x[k] * q_w[k]  -  sum_k q_x[k])
 *
 * The integer part (codes unsigned for AVX2's maddubs; the "-1" is the block's sum of
 * q_x, subtracted once) is exact, and it is one integer per block: the float part is
 * then one step per block, acc = acc + (float)isum * (d_x * d_w), in block order. Every
 * path -- the portable loop, the row kernels, the 8-row tiles below, AVX2 or VNNI --
 * computes those same steps (no FMA: -ffp-contract=off), so they give the same bits, and
 * a row's result depends on nothing but that row: a batch equals each row alone.
 *
 * Tiles ("tq2_x8"): the rows of each group of 8, per block b, as one 528-byte tile --
 * d[8] (fp16), then for p = 0..15 the 4-byte pieces qs[4p..4p+3] of rows 0..7 side by
 * side -- a permutation within the group, made once at a layer's first CPU forward. A
 * piece of row r sits in 32-bit lane r; shifted by 2n and masked it holds the codes of
 * values 128h + 32n + 4k + (0..3) (p = 8h + k), so 4 activation bytes broadcast to the 8
 * lanes give each row its own products (vpdpbusd, or maddubs + madd), the tile is read
 * front to back (a decode step's 8 rows as one stream), and the float step is one vector
 * operation for the 8 rows.
 */

#define TQ_ROWS 4 /* activation rows sharing one unpacking of a weight block */
#define TQ2_TILE (8 * 66) /* bytes of 8 rows' block b in the tiles */

typedef struct { uint8_t qs[QK_K / 4]; uint16_t d; } block_tq2_0;
_Static_assert(sizeof(block_tq2_0) == 66, "tq2_0 block");

/* An activation block as llama.cpp's Q8_K holds it, with the sum of its quants. */
typedef struct { float d; int32_t bsum; int8_t qs[QK_K]; } block_q8k;

static void quantize_q8k(const float *x, block_q8k *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int i = 0; i < QK_K; i++) {
            const float ax = fabsf(x[i]);
            if (ax > amax) amax = ax, max = x[i];
        }
        int32_t sum = 0;
        if (amax == 0.0f) {
            memset(y[b].qs, 0, QK_K);
            y[b].d = 0.0f;
        } else {
            const float iscale = -127.0f / max;
            for (int i = 0; i < QK_K; i++) {
                const long v = lrintf(iscale * x[i]); /* round half to even, as GGML's nearest_int */
                y[b].qs[i] = (int8_t)(v > 127 ? 127 : v);
                sum += y[b].qs[i];
            }
            y[b].d = 1.0f / iscale;
        }
        y[b].bsum = sum;
    }
}

/* One block of a row against activation block y: the block's integer, then the float
 * step every path takes. */
static float tq2_step(float acc, const block_tq2_0 *w, const block_q8k *y) {
    int32_t isum = -y->bsum;
    for (int h = 0; h < 2; h++)
        for (int n = 0; n < 4; n++)
            for (int j = 0; j < 32; j++) isum += ((w->qs[32 * h + j] >> (2 * n)) & 3) * y->qs[128 * h + 32 * n + j];
    return acc + (float)isum * (y->d * half_table[w->d]);
}

static float tq2_dot_ref(const block_tq2_0 *w, const block_q8k *y, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) acc = tq2_step(acc, &w[b], &y[b]);
    return acc;
}

/* Row r's block in a tile <-> the block as GGML holds it (to_tile = 0: out of the tile). */
static void tq2_tile_block(uint8_t *tile, int r, block_tq2_0 *block, int to_tile) {
    uint8_t *d = tile + 2 * r;
    if (to_tile) memcpy(d, &block->d, 2); else memcpy(&block->d, d, 2);
    for (int p = 0; p < 16; p++) {
        uint8_t *piece = tile + 16 + 32 * p + 4 * r;
        if (to_tile) memcpy(piece, block->qs + 4 * p, 4); else memcpy(block->qs + 4 * p, piece, 4);
    }
}

/* GGML rows [N, nb blocks] <-> tiles (to_x8 = 0: back). N % 8 == 0. */
static void tq2_repack(const uint8_t *src, uint8_t *dst, int64_t N, int64_t nb, int to_x8) {
    const int64_t row_bytes = nb * (int64_t)sizeof(block_tq2_0);
    for (int64_t g = 0; g < N / 8; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *tile = (to_x8 ? dst : (uint8_t *)src) + g * 8 * row_bytes + b * TQ2_TILE;
            for (int r = 0; r < 8; r++)
                tq2_tile_block(tile, r,
                               (block_tq2_0 *)((to_x8 ? (uint8_t *)src : dst) + (g * 8 + r) * row_bytes) + b,
                               to_x8);
        }
}

/* Row r of a group's tiles against activation row y: each block taken out of its tile,
 * then tq2_dot_ref's steps. */
static float tq2_tile_ref(const uint8_t *tiles, int r, const block_q8k *y, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        block_tq2_0 block;
        tq2_tile_block((uint8_t *)tiles + b * TQ2_TILE, r, &block, 0);
        acc = tq2_step(acc, &block, &y[b]);
    }
    return acc;
}

#if HAVE_X86
/* The dot products: AVX2's, and AVX-512 VNNI's where the CPU has it (same bits). */
#define TQ2_TARGET AVX2
#define TQ2_VNNI 0
#define TQ2_NAME(f) f##_avx2
#include "kernels_tq2_dot.h"
#undef TQ2_TARGET
#undef TQ2_VNNI
#undef TQ2_NAME
#define TQ2_TARGET VNNI
#define TQ2_VNNI 1
#define TQ2_NAME(f) f##_vnni
#include "kernels_tq2_dot.h"
#undef TQ2_TARGET
#undef TQ2_VNNI
#undef TQ2_NAME
#endif

/* y[M, N] (fp32) = x[M, K] (fp32) @ W.T, W N rows of K/256 TQ2_0 blocks, as GGML rows or
 * (x8) as tiles. Returns -1 when out of memory, else 0. */
static int tq2_matmul(const float *x, const uint8_t *W, float *y, int64_t M, int64_t K, int64_t N, int threads,
                      int x8) {
    const int64_t nb = K / QK_K, row_bytes = nb * (int64_t)sizeof(block_tq2_0);
    block_q8k *xq = malloc(sizeof(block_q8k) * (size_t)(M * nb > 0 ? M * nb : 1));
    if (!xq) return -1;
    for (int64_t m = 0; m < M; m++) quantize_q8k(x + m * K, xq + m * nb, nb);
    /* threads over weight rows (groups of 8 in tiles): each streams a contiguous slice of W
     * once for all M rows */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < (x8 ? N / 8 : N); n++) {
        const uint8_t *w = W + n * (x8 ? 8 : 1) * row_bytes;
        for (int64_t m = 0; m < M; m += TQ_ROWS) {
            const int R = (int)(M - m < TQ_ROWS ? M - m : TQ_ROWS);
            const block_q8k *rows[TQ_ROWS];
            for (int r = 0; r < R; r++) rows[r] = xq + (m + r) * nb;
#if HAVE_X86
            if (use_avx2 && x8) {
                float out[TQ_ROWS][8];
                (use_vnni ? tq2_tiles_vnni : tq2_tiles_avx2)(w, rows, R, nb, out);
                for (int r = 0; r < R; r++) memcpy(y + (m + r) * N + 8 * n, out[r], sizeof out[r]);
                continue;
            }
            if (use_avx2) {
                float out[TQ_ROWS];
                (use_vnni ? tq2_dot_rows_vnni : tq2_dot_rows_avx2)((const block_tq2_0 *)w, rows, R, nb, out);
                for (int r = 0; r < R; r++) y[(m + r) * N + n] = out[r];
                continue;
            }
#endif
            for (int r = 0; r < R; r++)
                for (int i = 0; i < (x8 ? 8 : 1); i++)
                    y[(m + r) * N + n * (x8 ? 8 : 1) + i] =
                        x8 ? tq2_tile_ref(w, i, rows[r], nb) : tq2_dot_ref((const block_tq2_0 *)w, rows[r], nb);
        }
    }
    free(xq);
    return 0;
}
