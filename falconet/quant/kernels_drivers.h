/* The GEMV / GEMM drivers: work split over threads, activations rounded once per call. Included once by _kernels.c. */

/* ---- drivers -------------------------------------------------------------------- */

/* Rows per unit of work. Each thread streams contiguous slices of W, which the hardware
 * prefetchers follow; handing out small chunks dynamically interleaves the threads'
 * reads and cost a third of the bandwidth here (the x8 GEMV hands out long runs). */
#define ROW_CHUNK 16
#define X8_UNITS_PER_THREAD 8

/* Units of `per` out of n items, and unit c's [lo, hi). */
static inline int64_t n_units(int64_t n, int64_t per) { return (n + per - 1) / per; }
static inline void unit_bounds(int64_t c, int64_t n, int64_t per, int64_t *lo, int64_t *hi) {
    *lo = c * per;
    *hi = *lo + per < n ? *lo + per : n;
}

/* The M activation rows rounded to 8-bit blocks (malloc'd; NULL when out of memory). */
static block_x8 *quantize_activations(int type, const float *x, int64_t M, int64_t K) {
    const int64_t nb = K / QK;
    block_x8 *xq = malloc(sizeof(block_x8) * (size_t)(M * nb ? M * nb : 1));
    if (!xq) return NULL;
    for (int64_t r = 0; r < M; r++) {
#if HAVE_X86
        if (use_avx2) {
            quantize_x8_avx2(x + r * K, xq + r * nb, nb, type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0);
            continue;
        }
#endif
        quantize_x8_ref(x + r * K, xq + r * nb, nb);
    }
    return xq;
}

static void gemv(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M,
                 float *y, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    block_x8 *xq = quantize_activations(type, x, M, K);
    if (!xq) return;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_units(N, ROW_CHUNK); c++) {
        int64_t n0, n1;
        unit_bounds(c, N, ROW_CHUNK, &n0, &n1);
#if HAVE_X86
        if (use_avx2) { gemv_rows_avx2(type, W, row_bytes, n0, n1, nb, xq, M, N, y); continue; }
#endif
        gemv_rows_ref(type, W, row_bytes, n0, n1, nb, xq, M, N, y);
    }
    free(xq);
}


/* x8 layout: AVX2 only (kernels.py repacks only where simd() == "avx2"). */
static void gemv_x8(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M,
                    float *y, int threads) {
#if HAVE_X86
    const int64_t nb = K / QK, groups = N / X8;
    const size_t group_bytes = (size_t)X8 * nb * block_bytes(type);
    block_x8 *xq = quantize_activations(type, x, M, K); /* use_avx2: kernels.py checks */
    if (!xq) return;
    (void)threads;
    /* X8_UNITS_PER_THREAD contiguous runs of groups per thread, handed out as threads free
     * up: each run is long enough for the prefetchers (hundreds of KB), and a thread that
     * shares its core with another process takes fewer runs instead of holding the whole
     * call back (a static split waits for the slowest thread). A group is always one
     * thread's, so the bits never depend on the schedule. */
    int64_t per = groups / ((int64_t)threads * X8_UNITS_PER_THREAD);
    per = per < ROW_CHUNK / X8 ? ROW_CHUNK / X8 : per;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_units(groups, per); c++) {
        int64_t g0, g1;
        unit_bounds(c, groups, per, &g0, &g1);
        gemv_groups_x8(type, W, group_bytes, g0, g1, nb, xq, M, N, y);
    }
    free(xq);
#endif
}

static void dequantize(int type, const uint8_t *W, int64_t N, int64_t K, float *out, int threads) {
    const int64_t nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(type);
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_units(N, ROW_CHUNK); c++) {
        int64_t n0, n1;
        unit_bounds(c, N, ROW_CHUNK, &n0, &n1);
#if HAVE_X86
        if (use_avx2) { dequant_rows_avx2(type, W, row_bytes, n0, n1, nb, out); continue; }
#endif
        dequant_rows_ref(type, W, row_bytes, n0, n1, nb, out);
    }
}
