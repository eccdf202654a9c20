/* Row-invariant float linear: out[m, n] = sum_k x[m, k] * w[n, k] for fp32 activations
 * and fp32, bf16 or fp16 weights. Included once by _kernels.c (after kernels_rows.h,
 * whose hsum it shares).
 *
 * Why not BLAS: PyTorch's fp32 GEMV (1 row) and GEMM (2+ rows) sum in different orders,
 * so a row's result depends on how many rows share the call; a server batching requests
 * together would then answer one request differently depending on its neighbours. Here
 * every output element has one fixed arithmetic order whatever M, the neighbouring
 * rows, the tile an element falls in, or the thread count:
 *
 *   acc = 8 lanes of 0; for each k0 = 0, 8, 16, ... : acc[l] = fma(x[k0+l], w[k0+l], acc[l])
 *   (the last K % 8 lanes read x = w = 0), then acc folds as
 *   ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))  (hsum's order).
 *
 * The AVX2 path keeps one ymm accumulator per (n, m) pair; the portable path keeps eight
 * floats and does the same operations (C's fmaf) in the same order, so the two agree bit
 * for bit. The thread count only decides which thread computes an element, never how.
 *
 * Narrow weights follow falconet.linear.Linear: x is rounded to the weight dtype (round
 * to nearest even, as torch's .to() does), products and sums are fp32, and the sum is
 * rounded to the weight dtype before it is stored as fp32.
 *
 * Blocking: a tile of 3 weight rows x 4 activation rows is 12 accumulators, 3 weight
 * vectors and 1 activation vector, the 16 ymm registers; each weight vector is loaded
 * (and widened) once per tile and serves 4 rows, each activation vector serves 3. A
 * single activation row (decode) takes 6 weight rows per tile instead, so 6 independent
 * FMA chains hide the FMA latency. Tiles at the edges (fewer rows of either) run the
 * same per-element steps. While a tile makes its first pass, it prefetches the next
 * tile's weight rows into L2 (without it, one row against a bf16 8192x2048 weight took
 * 1.04 ms instead of 0.79 ms on the 2-core dev machine). Activation rows go in chunks of about
 * LIN_X_BYTES (rounded into a buffer once per chunk, and kept in L2 while the weights
 * pass), and within a chunk every thread walks a static, contiguous slice of the output
 * features.
 */

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };
#define LINEAR_UNROUNDED 16 /* a flag on linear_rows' dtype code: leave the output in fp32 */

#define LIN_R 3          /* weight rows (output features) per tile */
#define LIN_C 4          /* activation rows per tile */
#define LIN_R_DECODE 6   /* weight rows per tile when there is one activation row */
#define LIN_ROW_CHUNK 24 /* output features per unit of work: whole tiles of 3 and of 6 */
#define LIN_X_BYTES (512 << 10) /* activation rows per chunk: about this many bytes */
/* Below this many multiply-adds one thread finishes before a second would wake up. */
#define LIN_SERIAL_FMAS (1 << 17)

static size_t weight_size(int wt) { return wt == W_F32 ? 4 : 2; }

static inline float float_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float -> bf16 -> float as torch rounds it: to nearest even, NaN to the canonical NaN. */
static inline float round_bf16(float f) {
    if (f != f) return float_from_bits(0x7fc00000u);
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return float_from_bits(u & 0xffff0000u);
}

static inline float round_to_weight(int wt, float f) {
    if (wt == W_BF16) return round_bf16(f);
    if (wt == W_F16) return f != f ? f : round_to_half(f);
    return f;
}

static inline float weight_at(int wt, const uint8_t *row, int64_t k) {
    if (wt == W_F32) return ((const float *)row)[k];
    const uint16_t h = ((const uint16_t *)row)[k];
    return wt == W_BF16 ? float_from_bits((uint32_t)h << 16) : half_table[h];
}

/* hsum's fold of 8 lanes, written out for the portable path. */
static inline float fold8(const float a[8]) {
    const float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
    return (s0 + s2) + (s1 + s3);
}

/* sum a[k] * b[k] over K: 8 lanes of fused multiply-adds (a zero-padded tail), then
 * fold8 -- the AVX2 loops' order, so the portable path gives their bits. */
static inline float dot_fold8(const float *a, const float *b, int64_t K) {
    const int64_t K8 = K / 8 * 8;
    float acc[8] = {0}, atail[8] = {0}, btail[8] = {0};
    for (int64_t k = 0; k < K8; k += 8)
        for (int l = 0; l < 8; l++) acc[l] = fmaf(a[k + l], b[k + l], acc[l]);
    if (K8 < K) {
        memcpy(atail, a + K8, sizeof(float) * (size_t)(K - K8));
        memcpy(btail, b + K8, sizeof(float) * (size_t)(K - K8));
        for (int l = 0; l < 8; l++) acc[l] = fmaf(atail[l], btail[l], acc[l]);
    }
    return fold8(acc);
}

/* ---- portable kernel ------------------------------------------------------------- */

/* Output features n0..n1 for the M rows of x (already rounded); wbuf holds K + 8 floats. */
static void linear_rows_ref(int wt, const uint8_t *W, const float *x, int64_t M, int64_t K,
                            int64_t N, int64_t n0, int64_t n1, float *out, float *wbuf) {
    const size_t row_bytes = (size_t)K * weight_size(wt);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t k = 0; k < K; k++) wbuf[k] = weight_at(wt, W + n * row_bytes, k);
        for (int64_t m = 0; m < M; m++) out[m * N + n] = dot_fold8(x + m * K, wbuf, K);
    }
}

/* ---- AVX2 kernel ----------------------------------------------------------------- */
#if HAVE_X86

/* 8 weights from index k, widened to fp32. */
AVX2 static inline __attribute__((always_inline)) __m256 load_w8(int wt, const uint8_t *row, int64_t k) {
    if (wt == W_F32) return _mm256_loadu_ps((const float *)row + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (wt == W_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The last rem (< 8) weights of a row, zero-filled: a full load would run past the row. */
AVX2 static inline __attribute__((always_inline)) __m256 load_w_tail(int wt, const uint8_t *row, int64_t k,
                                                                   int rem) {
    uint8_t buf[32] = {0};
    memcpy(buf, row + k * weight_size(wt), (size_t)rem * weight_size(wt));
    return load_w8(wt, buf, 0);
}

AVX2 static inline __attribute__((always_inline)) __m256i tail_mask(int rem) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* R weight rows x C activation rows. Inlined with constant R, C and pf, the loops unroll
 * and the accumulators live in registers. pf: also prefetch the next tile's weight rows
 * into L2, one line per row per 64 bytes (the first pass over a tile only; the others
 * find its rows in cache). */
AVX2 static inline __attribute__((always_inline)) void linear_tile_avx2(
    int wt, int R, int C, int pf, const uint8_t *w, size_t row_bytes, const float *x, int64_t K,
    float *out, int64_t N) {
    __m256 acc[LIN_R_DECODE][LIN_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    const int64_t line = 64 / (int64_t)weight_size(wt); /* weights per cache line */
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[LIN_R_DECODE];
        for (int r = 0; r < R; r++) wv[r] = load_w8(wt, w + r * row_bytes, k);
        if (pf && (k & (line - 1)) == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(w + (R + r) * row_bytes) + k * weight_size(wt), _MM_HINT_T1);
        for (int c = 0; c < C; c++) {
            const __m256 xv = _mm256_loadu_ps(x + c * K + k);
            for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    if (k < K) {
        const int rem = (int)(K - k);
        const __m256i mask = tail_mask(rem);
        __m256 wv[LIN_R_DECODE];
        for (int r = 0; r < R; r++) wv[r] = load_w_tail(wt, w + r * row_bytes, k, rem);
        for (int c = 0; c < C; c++) {
            const __m256 xv = _mm256_maskload_ps(x + c * K + k, mask);
            for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * N + r] = hsum(acc[r][c]);
}

/* Output features n0..n1 against all M activation rows. A single row (decode) takes
 * LIN_R_DECODE weight rows per tile: its accumulators are the only independent FMA
 * chains, and three would leave the FMA units waiting on latency. */
AVX2 static inline __attribute__((always_inline)) void linear_rows_avx2_t(
    int wt, const uint8_t *W, const float *x, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
    float *out) {
    const size_t row_bytes = (size_t)K * weight_size(wt);
    int64_t n = n0;
    if (M == 1)
        for (; n + LIN_R_DECODE <= n1; n += LIN_R_DECODE)
            linear_tile_avx2(wt, LIN_R_DECODE, 1, 1, W + n * row_bytes, row_bytes, x, K, out + n, N);
    for (; n + LIN_R <= n1; n += LIN_R) {
        const uint8_t *w = W + n * row_bytes;
        int64_t m = 0;
        for (; m + LIN_C <= M; m += LIN_C) {
            if (m == 0) linear_tile_avx2(wt, LIN_R, LIN_C, 1, w, row_bytes, x, K, out + n, N);
            else linear_tile_avx2(wt, LIN_R, LIN_C, 0, w, row_bytes, x + m * K, K, out + m * N + n, N);
        }
        switch (M - m) { /* prefetch only when the tail tile is the first pass */
        case 3: linear_tile_avx2(wt, LIN_R, 3, m == 0, w, row_bytes, x + m * K, K, out + m * N + n, N); break;
        case 2: linear_tile_avx2(wt, LIN_R, 2, m == 0, w, row_bytes, x + m * K, K, out + m * N + n, N); break;
        case 1: linear_tile_avx2(wt, LIN_R, 1, m == 0, w, row_bytes, x + m * K, K, out + m * N + n, N); break;
        }
    }
    for (; n < n1; n++) {
        const uint8_t *w = W + n * row_bytes;
        int64_t m = 0;
        for (; m + LIN_C <= M; m += LIN_C) linear_tile_avx2(wt, 1, LIN_C, 0, w, row_bytes, x + m * K, K, out + m * N + n, N);
        for (; m < M; m++) linear_tile_avx2(wt, 1, 1, 0, w, row_bytes, x + m * K, K, out + m * N + n, N);
    }
}

AVX2 static void linear_rows_avx2(int wt, const uint8_t *W, const float *x, int64_t M, int64_t K,
                                  int64_t N, int64_t n0, int64_t n1, float *out) {
    switch (wt) {
    case W_BF16: linear_rows_avx2_t(W_BF16, W, x, M, K, N, n0, n1, out); break;
    case W_F16: linear_rows_avx2_t(W_F16, W, x, M, K, N, n0, n1, out); break;
    default: linear_rows_avx2_t(W_F32, W, x, M, K, N, n0, n1, out);
    }
}
#endif

/* ---- driver ---------------------------------------------------------------------- */

/* out[M, N] = x[M, K] @ W[N, K].T in fp32 (narrow W: x rounded to its dtype, and out too
 * when round_out; a tensor-parallel rank leaves its partial sums unrounded, so the sum
 * over ranks is rounded once, as one process rounds). The tiles store fp32 sums; each
 * unit's outputs are rounded right after, while in cache.
 * Returns 0, or -1 when out of memory (out is then incomplete). */
static int linear_rows(int wt, int round_out, const float *x, const uint8_t *W, float *out, int64_t M,
                       int64_t K, int64_t N, int threads) {
    int64_t chunk = LIN_X_BYTES / (K * 4) / LIN_C * LIN_C;
    if (chunk < LIN_C) chunk = LIN_C;
    if (chunk > M) chunk = M;
    float *xr = NULL;
    if (wt != W_F32 && M) {
        xr = malloc(sizeof(float) * (size_t)(chunk * K));
        if (!xr) return -1;
    }
    int failed = 0;
    if ((double)M * (double)N * (double)K < LIN_SERIAL_FMAS) threads = 1;
    (void)threads;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t rows = M - m0 < chunk ? M - m0 : chunk;
        const float *xc = xr ? xr : x + m0 * K;
        float *oc = out + m0 * N;
#pragma omp parallel num_threads(threads)
        {
            if (xr) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < rows * K; i++) xr[i] = round_to_weight(wt, x[m0 * K + i]);
            }
            float *wbuf = NULL;
#if HAVE_X86
            if (!use_avx2)
#endif
            {
                wbuf = malloc(sizeof(float) * (size_t)(K + 8));
                if (!wbuf) {
#pragma omp atomic write
                    failed = 1;
                }
            }
#pragma omp for schedule(static)
            for (int64_t c = 0; c < n_units(N, LIN_ROW_CHUNK); c++) {
                int64_t n0, n1;
                unit_bounds(c, N, LIN_ROW_CHUNK, &n0, &n1);
#if HAVE_X86
                if (use_avx2) linear_rows_avx2(wt, W, xc, rows, K, N, n0, n1, oc);
                else
#endif
                if (wbuf) linear_rows_ref(wt, W, xc, rows, K, N, n0, n1, oc, wbuf);
                if (round_out && wt != W_F32)
                    for (int64_t m = 0; m < rows; m++)
                        for (int64_t n = n0; n < n1; n++) oc[m * N + n] = round_to_weight(wt, oc[m * N + n]);
            }
            free(wbuf);
        }
    }
    free(xr);
    return failed ? -1 : 0;
}
