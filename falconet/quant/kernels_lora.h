/* The LoRA update of decode rows (falconet/nn/lora.py), each row through its own adapter:
 *
 *     h = scaling * A x        (rank values: dot products of K, 8 lanes then hsum's fold)
 *     y = y + B h              (N values: rank multiply-adds each, in rank order)
 *
 * one call per layer for every row of a step that has an adapter, added in place to the
 * layer's output rows (fp32 or bf16, rounded once as torch rounds
 * `(y.float() + d).to(bf16)`). A decode step has a handful of rows per adapter:
 * per-adapter GEMMs cost more in call overhead than arithmetic, and one GEMM over every
 * adapter stacked does every row times every adapter's work. Here each row does its own
 * adapter's work only, rows of one adapter in tiles that load each weight once for up to
 * LORA_TILE rows (prompts: hundreds of rows per adapter); no fp32 copy of the layer's
 * input or output is made.
 *
 * Each row's bits depend on that row alone (fixed orders, no cross-row sums), whatever
 * rows share the call and however many threads run it; the AVX2 path equals the
 * portable one bit for bit (the same lane order and fold, fused multiply-adds both).
 * Included once by _kernels.c, after kernels_float.h (dot_fold8, round_bf16, hsum). */

/* Below this many multiply-adds a second thread costs more than it saves. */
#define LORA_SERIAL_FMAS (1 << 16)
/* From this many rows x (K + N) on, the Python wrapper releases the GIL (a prompt's rows;
 * 64 rows of a 1024 x 4096 layer: a millisecond and more). */
#define LORA_RELEASE_GIL (1 << 18)

static inline uint16_t bf16_bits(float f) {
    const float r = round_bf16(f);
    uint32_t u;
    memcpy(&u, &r, 4);
    return (uint16_t)(u >> 16);
}

static inline float bf16_value(uint16_t h) { return float_from_bits((uint32_t)h << 16); }

/* y_row (fp32 or bf16) += d, n values. */
static void lora_store_ref(void *y_row, int y_bf16, const float *d, int64_t n0, int64_t n) {
    if (y_bf16) {
        uint16_t *y = (uint16_t *)y_row;
        for (int64_t i = n0; i < n; i++) y[i] = bf16_bits(bf16_value(y[i]) + d[i]);
    } else {
        float *y = (float *)y_row;
        for (int64_t i = n0; i < n; i++) y[i] = y[i] + d[i];
    }
}

static void lora_row_ref(const float *x, const float *A, const float *Bt, int64_t K, int64_t N,
                         int rank, float scale, float *h, float *d, void *y_row, int y_bf16) {
    for (int j = 0; j < rank; j++) h[j] = dot_fold8(x, A + (int64_t)j * K, K) * scale;
    for (int64_t n = 0; n < N; n++) d[n] = 0.0f;
    for (int j = 0; j < rank; j++) {
        const float *b = Bt + (int64_t)j * N;
        for (int64_t n = 0; n < N; n++) d[n] = fmaf(h[j], b[n], d[n]);
    }
    lora_store_ref(y_row, y_bf16, d, 0, N);
}

#if HAVE_X86
/* T (<= LORA_TILE) rows through one adapter: each A row and B row loaded once for the T
 * rows; every row's sums in the order lora_row_ref uses, so T changes no bit. */
#define LORA_TILE 4
AVX2 static void lora_tile_avx2(int T, const float *const *xs, const float *A, const float *Bt, int64_t K,
                                int64_t N, int rank, float scale, float *h /* T x rank */, float *d,
                                void *const *y_rows, int y_bf16) {
    const int64_t K8 = K / 8 * 8, N8 = N / 8 * 8;
    const __m256i kmask = tail_mask((int)(K - K8 > 0 ? K - K8 : 8));
    for (int j = 0; j < rank; j++) {
        const float *a = A + (int64_t)j * K;
        __m256 acc[LORA_TILE];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            const __m256 av = _mm256_loadu_ps(a + k);
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[t] + k), av, acc[t]);
        }
        if (K8 < K) {
            const __m256 av = _mm256_maskload_ps(a + K8, kmask);
            for (int t = 0; t < T; t++)
                acc[t] = _mm256_fmadd_ps(_mm256_maskload_ps(xs[t] + K8, kmask), av, acc[t]);
        }
        for (int t = 0; t < T; t++) h[t * rank + j] = hsum(acc[t]) * scale;
    }
    for (int64_t n = 0; n < N8; n += 8) {
        __m256 acc[LORA_TILE];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int j = 0; j < rank; j++) {
            const __m256 bv = _mm256_loadu_ps(Bt + (int64_t)j * N + n);
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(h[t * rank + j]), bv, acc[t]);
        }
        for (int t = 0; t < T; t++) {
            if (y_bf16) {
                uint16_t *y = (uint16_t *)y_rows[t] + n;
                const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)y)), 16);
                const __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(wide), acc[t]);
                /* round to nearest even, NaN to the canonical NaN (round_bf16) */
                const __m256i u = _mm256_castps_si256(sum);
                const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
                const __m256 nan = _mm256_cmp_ps(sum, sum, _CMP_UNORD_Q);
                r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
                const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
                _mm_storeu_si128((__m128i *)y, _mm256_castsi256_si128(packed));
            } else {
                float *y = (float *)y_rows[t] + n;
                _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), acc[t]));
            }
        }
    }
    if (N8 < N) /* the tail as the portable path computes it */
        for (int t = 0; t < T; t++) {
            for (int64_t n = N8; n < N; n++) d[n] = 0.0f;
            for (int j = 0; j < rank; j++)
                for (int64_t n = N8; n < N; n++) d[n] = fmaf(h[t * rank + j], Bt[(int64_t)j * N + n], d[n]);
            lora_store_ref(y_rows[t], y_bf16, d, N8, N);
        }
}
#else
#define LORA_TILE 1
#endif

/* R rows: row rows[i] of x (rows x K, fp32 or bf16, the layer's input) goes through the
 * adapter whose A rows start at start[i] (A: ranks x K, adapters stacked) and B columns
 * likewise (Bt: ranks x N, B transposed), rank[i] of them, times scale[i]; the update is
 * added to row rows[i] of y (rows x N, fp32 or bf16, the layer's output). Rows of one
 * adapter next to each other share tiles.
 * Returns -1 when out of memory. */
static int lora_rows(const void *x, int x_bf16, int64_t R, int64_t K, const float *A, const float *Bt, int64_t N,
                     const int32_t *start, const int32_t *rank, const float *scale, const int64_t *out_rows,
                     void *y, int y_bf16, int threads) {
    int64_t work = 0, max_rank = 1;
    for (int64_t i = 0; i < R; i++) {
        work += (int64_t)rank[i] * (K + N);
        if (rank[i] > max_rank) max_rank = rank[i];
    }
    /* tiles: runs of up to LORA_TILE rows with the same adapter */
    int64_t *tiles = malloc(sizeof(int64_t) * (size_t)(R + 1));
    if (!tiles) return -1;
    int64_t n_tiles = 0;
    for (int64_t i = 0; i < R;) {
        tiles[n_tiles++] = i;
        int64_t e = i + 1;
        while (e < R && e - i < LORA_TILE && start[e] == start[i] && rank[e] == rank[i]) e++;
        i = e;
    }
    tiles[n_tiles] = R;
    if (work < LORA_SERIAL_FMAS || n_tiles < 2) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *h = malloc(sizeof(float) * (size_t)(max_rank * LORA_TILE));
        float *d = malloc(sizeof(float) * (size_t)N);
        float *xbuf = x_bf16 ? malloc(sizeof(float) * (size_t)(K * LORA_TILE)) : NULL;
        const int ok = h && d && (xbuf || !x_bf16);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread meets the loop (a worksharing construct), one without buffers idle */
#pragma omp for schedule(static)
        for (int64_t ti = 0; ti < n_tiles; ti++) {
            if (!ok) continue;
            const int64_t i0 = tiles[ti], T = tiles[ti + 1] - i0, s = start[i0];
            const float *xs[LORA_TILE];
            void *y_rows[LORA_TILE];
            for (int64_t t = 0; t < T; t++) {
                if (x_bf16) {
                    const uint16_t *xr = (const uint16_t *)x + out_rows[i0 + t] * K;
                    for (int64_t k = 0; k < K; k++) xbuf[t * K + k] = bf16_value(xr[k]);
                    xs[t] = xbuf + t * K;
                } else {
                    xs[t] = (const float *)x + out_rows[i0 + t] * K;
                }
                y_rows[t] = (uint8_t *)y + out_rows[i0 + t] * N * (y_bf16 ? 2 : 4);
            }
#if HAVE_X86
            if (use_avx2) {
                lora_tile_avx2((int)T, xs, A + s * K, Bt + s * N, K, N, rank[i0], scale[i0], h, d, y_rows, y_bf16);
                continue;
            }
#endif
            for (int64_t t = 0; t < T; t++)
                lora_row_ref(xs[t], A + s * K, Bt + s * N, K, N, rank[i0], scale[i0], h, d, y_rows[t], y_bf16);
        }
        free(h);
        free(d);
        free(xbuf);
    }
    free(tiles);
    return failed ? -1 : 0;
}
