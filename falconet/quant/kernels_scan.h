/* The SSM scans over T tokens, fp32: Mamba-1's selective scan (falconet/nn/
 * selective_scan.py) and, below, Mamba-2's recurrence (falconet/nn/ssd.py). Included
 * once by _kernels.c, after kernels_float.h (whose tail_mask and fold8 it shares).
 *
 * Per sequence b, channel e and state index n, with h carried in and out:
 *
 *   h = exp(dt[t,e] * A[e,n]) * h + (dt[t,e] * B[t,n]) * u[t,e]
 *   y[t,e] = sum_n h * C[t,n]            (n = 0, 1, ..., N-1, in that order)
 *
 * Why compiled: PyTorch runs the recurrence as a Python loop over tokens, a few (E, N)
 * tensor operations per token; at Falcon-Mamba-7B's width (E 8192, N 16) that took
 * three quarters as long as all of the layer's matmuls at prefill (docs/benchmarks.md,
 * issue 13). Here a block of 8 channels keeps its (N, 8) state in L1 across all T
 * tokens: 13x faster.
 *
 * Vector lanes run over 8 neighbouring channels (u, dt and y are contiguous along e, B
 * and C values are broadcast), so any N works and y needs no horizontal sum. The last
 * block of E % 8 channels runs masked.
 *
 * Determinism: each (b, e) is computed alone, token by token, with the same operations
 * whatever T, the batch, the block it falls in or the thread count; so a prompt scanned
 * whole, in chunks, or a token at a time (decode) gives the same bits. The portable
 * path does the same operations in the same order (C's fmaf where AVX2 fuses; the
 * build's -ffp-contract=off keeps the compiler from fusing anything else), so it
 * agrees with the AVX2 path bit for bit.
 *
 * Against the PyTorch path (torch.exp, separate multiply and add, its own order of the
 * sum over N) results differ by rounding only: ~1e-7 relative on the tests' inputs
 * (which allow 1e-5).
 * Per vector of 8 updates the work is about 20 floating-point operations, most of them
 * the exp, which is what bounds the kernel.
 */

#define SCAN_LANES 8
/* Below this many state updates one thread finishes before a second would wake up. */
#define SCAN_SERIAL_UPDATES (1 << 16)

/* exp(x) = 2^(x log2 e): A is scaled by log2 e once per block (AT below), so the
 * kernel needs 2^t for t = dt * A log2 e; t = n + f with n = round(t) and f in
 * [-1/2, 1/2] exactly (t - n is exact), and 2^f = 1 + f P(f), Cephes' exp2f polynomial
 * (relative error below 2e-7). 2^n goes into the exponent bits. Rounding A log2 e
 * adds up to |t| 2^-24 relative: 1e-6 at exp(-20) ~ 2e-9, where the decayed state no
 * longer shows in the sum. */
#define EXP2_LO -126.0f /* 2^n stays a normal float; smaller decays read as about 2^-126 */
#define EXP2_HI 127.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP2_P0 1.535336188319500e-4f
#define EXP2_P1 1.339887440266574e-3f
#define EXP2_P2 9.618437357674640e-3f
#define EXP2_P3 5.550332471162809e-2f
#define EXP2_P4 2.402264791363012e-1f
#define EXP2_P5 6.931472028550421e-1f

static inline float scan_exp2_ref(float t) {
    if (t != t) return t;
    t = t < EXP2_LO ? EXP2_LO : t;
    t = t > EXP2_HI ? EXP2_HI : t;
    const float n = nearbyintf(t), f = t - n;
    float p = EXP2_P0;
    p = fmaf(p, f, EXP2_P1);
    p = fmaf(p, f, EXP2_P2);
    p = fmaf(p, f, EXP2_P3);
    p = fmaf(p, f, EXP2_P4);
    p = fmaf(p, f, EXP2_P5);
    return fmaf(p, f, 1.0f) * float_from_bits((uint32_t)((int32_t)n + 127) << 23);
}

/* One block of `lanes` (<= 8) channels of one sequence over T tokens. h: the block's
 * state rows (stride N); u, dt, y: token rows (stride E) at the block's first channel;
 * B, C: token rows (stride N); A: the block's rows (stride N). hT, AT: 8 * N floats of
 * scratch, the state and A transposed to (n, lane). */
static void scan_block_ref(float *h, const float *u, const float *dt, const float *A, const float *B,
                           const float *C, float *y, int64_t T, int64_t E, int64_t N, int lanes, float *hT,
                           float *AT) {
    for (int64_t n = 0; n < N; n++)
        for (int l = 0; l < SCAN_LANES; l++) {
            hT[n * SCAN_LANES + l] = l < lanes ? h[l * N + n] : 0.0f;
            AT[n * SCAN_LANES + l] = l < lanes ? A[l * N + n] * EXP_LOG2E : 0.0f;
        }
    for (int64_t t = 0; t < T; t++) {
        const float *bt = B + t * N, *ct = C + t * N;
        float d[SCAN_LANES] = {0}, x[SCAN_LANES] = {0}, acc[SCAN_LANES] = {0};
        for (int l = 0; l < lanes; l++) {
            d[l] = dt[t * E + l];
            x[l] = u[t * E + l];
        }
        for (int64_t n = 0; n < N; n++) {
            float *hn = hT + n * SCAN_LANES;
            const float *an = AT + n * SCAN_LANES;
            for (int l = 0; l < SCAN_LANES; l++) {
                const float decay = scan_exp2_ref(d[l] * an[l]);
                const float input = (d[l] * bt[n]) * x[l];
                hn[l] = fmaf(decay, hn[l], input);
                acc[l] = fmaf(hn[l], ct[n], acc[l]);
            }
        }
        for (int l = 0; l < lanes; l++) y[t * E + l] = acc[l];
    }
    for (int64_t n = 0; n < N; n++)
        for (int l = 0; l < lanes; l++) h[l * N + n] = hT[n * SCAN_LANES + l];
}

#if HAVE_X86
AVX2 static inline __attribute__((always_inline)) __m256 scan_exp2_avx2(__m256 t) {
    /* max/min return their second operand when either is NaN: a NaN passes through */
    t = _mm256_max_ps(_mm256_set1_ps(EXP2_LO), t);
    t = _mm256_min_ps(_mm256_set1_ps(EXP2_HI), t);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_P0);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_P1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_P2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_P3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_P4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_P5));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(_mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f)), _mm256_castsi256_ps(bits));
}

AVX2 static void scan_block_avx2(float *h, const float *u, const float *dt, const float *A, const float *B,
                                 const float *C, float *y, int64_t T, int64_t E, int64_t N, int lanes, float *hT,
                                 float *AT) {
    for (int64_t n = 0; n < N; n++)
        for (int l = 0; l < SCAN_LANES; l++) {
            hT[n * SCAN_LANES + l] = l < lanes ? h[l * N + n] : 0.0f;
            AT[n * SCAN_LANES + l] = l < lanes ? A[l * N + n] * EXP_LOG2E : 0.0f;
        }
    const __m256i mask = tail_mask(lanes);
    for (int64_t t = 0; t < T; t++) {
        const float *bt = B + t * N, *ct = C + t * N;
        const __m256 d = _mm256_maskload_ps(dt + t * E, mask), x = _mm256_maskload_ps(u + t * E, mask);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t n = 0; n < N; n++) {
            const __m256 decay = scan_exp2_avx2(_mm256_mul_ps(d, _mm256_load_ps(AT + n * SCAN_LANES)));
            const __m256 input = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_set1_ps(bt[n])), x);
            const __m256 hn = _mm256_fmadd_ps(decay, _mm256_load_ps(hT + n * SCAN_LANES), input);
            _mm256_store_ps(hT + n * SCAN_LANES, hn);
            acc = _mm256_fmadd_ps(hn, _mm256_set1_ps(ct[n]), acc);
        }
        _mm256_maskstore_ps(y + t * E, mask, acc);
    }
    for (int64_t n = 0; n < N; n++)
        for (int l = 0; l < lanes; l++) h[l * N + n] = hT[n * SCAN_LANES + l];
}
#endif

/* h (batch, E, N) in/out; u, dt (batch, T, E); A (E, N); B, C (batch, T, N); y (batch,
 * T, E) out. All contiguous fp32. Returns 0, or -1 when out of memory (then nothing is
 * written). */
static int selective_scan(float *h, const float *u, const float *dt, const float *A, const float *B,
                          const float *C, float *y, int64_t batch, int64_t T, int64_t E, int64_t N, int threads) {
    const int64_t blocks = n_units(E, SCAN_LANES), units = batch * blocks;
    if ((double)units * SCAN_LANES * (double)T * (double)N < SCAN_SERIAL_UPDATES) threads = 1;
    if (threads > units) threads = units > 0 ? (int)units : 1;
    /* one scratch area per thread, allocated before any work so a failure writes nothing */
    const size_t per = (size_t)(2 * SCAN_LANES * N);
    float *scratch = aligned_alloc(32, ((sizeof(float) * per * (size_t)threads + 31) / 32) * 32);
    if (!scratch) return -1;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < units; c++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *hT = scratch + (size_t)tid * per, *AT = hT + SCAN_LANES * N;
        const int64_t b = c / blocks, e0 = (c % blocks) * SCAN_LANES;
        const int lanes = (int)(E - e0 < SCAN_LANES ? E - e0 : SCAN_LANES);
        float *hb = h + (b * E + e0) * N;
        const float *ub = u + b * T * E + e0, *db = dt + b * T * E + e0, *Ab = A + e0 * N;
        const float *Bb = B + b * T * N, *Cb = C + b * T * N;
        float *yb = y + b * T * E + e0;
#if HAVE_X86
        if (use_avx2) {
            scan_block_avx2(hb, ub, db, Ab, Bb, Cb, yb, T, E, N, lanes, hT, AT);
            continue;
        }
#endif
        scan_block_ref(hb, ub, db, Ab, Bb, Cb, yb, T, E, N, lanes, hT, AT);
    }
    free(scratch);
    return 0;
}

/* ---- Mamba-2 (SSD) ----------------------------------------------------------------
 *
 * falconet/nn/ssd.py's recurrence, per sequence b and head h with a scalar decay:
 *
 *   S = exp(dt[t,h] * A[h]) * S + (x[t,h,:] * dt[t,h]) B[t,g,:]^T      S: (P, N) fp32
 *   y[t,h,p] = sum_n S[p,n] C[t,g,n] + D[h] x[t,h,p]
 *
 * with g = h / (H / G). Why compiled: ssd.ssd_chunked's matrix form (masked (L, L)
 * products per chunk) costs more than the recurrence on a CPU, and pads a short call to
 * a whole chunk; run token by token, the recurrence is a few times faster at Falcon-H1
 * shapes (docs/benchmarks.md, issue 13).
 *
 * Lanes run over 8 consecutive n of a state row, in the state's own (P, N) layout, so a
 * decode step streams the state once with nothing to rearrange. The sum over n has one
 * fixed order: lane l accumulates n = l, l + 8, l + 16, ... (fused multiply-adds), then
 * the 8 lanes fold as hsum does, ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)); lanes past
 * N hold zeros. Same determinism as the Mamba-1 kernel: each (b, h) alone, token by
 * token, the portable path bit-equal. */

/* An SSD update is a few multiply-adds, no exp: about 6x cheaper than Mamba-1's, so
 * a second thread pays off only from about this many (an H1-0.5B decode step, 24 x 64 x
 * 128 updates, stays on one thread: ~0.03 ms). */
#define SSD_SERIAL_UPDATES (1 << 18)

static void ssd_head_ref(float *S, const float *x, const float *dt, float A2, float D, const float *B,
                         const float *C, float *y, int64_t T, int64_t xstride, int64_t dtstride,
                         int64_t bstride, int64_t P, int64_t N) {
    const int64_t nv = n_units(N, SCAN_LANES);
    for (int64_t t = 0; t < T; t++) {
        const float d = dt[t * dtstride], decay = scan_exp2_ref(d * A2);
        const float *xt = x + t * xstride, *bt = B + t * bstride, *ct = C + t * bstride;
        for (int64_t p = 0; p < P; p++) {
            const float xdt = xt[p] * d;
            float *row = S + p * N, acc[SCAN_LANES] = {0};
            for (int64_t v = 0; v < nv; v++)
                for (int l = 0; l < SCAN_LANES; l++) {
                    const int64_t n = v * SCAN_LANES + l;
                    const float b = n < N ? bt[n] : 0.0f, c = n < N ? ct[n] : 0.0f, old = n < N ? row[n] : 0.0f;
                    const float s = fmaf(xdt, b, decay * old);
                    if (n < N) row[n] = s;
                    acc[l] = fmaf(s, c, acc[l]);
                }
            y[t * xstride + p] = fmaf(D, xt[p], fold8(acc));
        }
    }
}

#if HAVE_X86
AVX2 static void ssd_head_avx2(float *S, const float *x, const float *dt, float A2, float D, const float *B,
                               const float *C, float *y, int64_t T, int64_t xstride, int64_t dtstride,
                               int64_t bstride, int64_t P, int64_t N) {
    const int64_t full = N / SCAN_LANES, rem = N % SCAN_LANES;
    const __m256i mask = tail_mask((int)rem);
    for (int64_t t = 0; t < T; t++) {
        const float d = dt[t * dtstride];
        const __m256 decay = _mm256_set1_ps(scan_exp2_ref(d * A2));
        const float *xt = x + t * xstride, *bt = B + t * bstride, *ct = C + t * bstride;
        for (int64_t p = 0; p < P; p++) {
            const __m256 xdt = _mm256_set1_ps(xt[p] * d);
            float *row = S + p * N;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t v = 0; v < full; v++) {
                const int64_t n = v * SCAN_LANES;
                const __m256 s =
                    _mm256_fmadd_ps(xdt, _mm256_loadu_ps(bt + n), _mm256_mul_ps(decay, _mm256_loadu_ps(row + n)));
                _mm256_storeu_ps(row + n, s);
                acc = _mm256_fmadd_ps(s, _mm256_loadu_ps(ct + n), acc);
            }
            if (rem) {
                const int64_t n = full * SCAN_LANES;
                const __m256 s = _mm256_fmadd_ps(xdt, _mm256_maskload_ps(bt + n, mask),
                                                 _mm256_mul_ps(decay, _mm256_maskload_ps(row + n, mask)));
                _mm256_maskstore_ps(row + n, mask, s);
                acc = _mm256_fmadd_ps(s, _mm256_maskload_ps(ct + n, mask), acc);
            }
            y[t * xstride + p] = fmaf(D, xt[p], hsum(acc));
        }
    }
}
#endif

/* S (batch, H, P, N) in/out; x (batch, T, H, P); dt (batch, T, H) discretized; A, D (H,);
 * B, C (batch, T, G, N); y (batch, T, H, P) out, D skip included. All contiguous fp32. */
static void ssd_scan(float *S, const float *x, const float *dt, const float *A, const float *D, const float *B,
                    const float *C, float *y, int64_t batch, int64_t T, int64_t H, int64_t P, int64_t G, int64_t N,
                    int threads) {
    const int64_t units = batch * H, per_group = H / G;
    if ((double)units * (double)T * (double)P * (double)N < SSD_SERIAL_UPDATES) threads = 1;
    if (threads > units) threads = units > 0 ? (int)units : 1;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < units; c++) {
        const int64_t b = c / H, h = c % H, g = h / per_group;
        const float A2 = A[h] * EXP_LOG2E;
        float *Sh = S + c * P * N;
        const float *xh = x + (b * T * H + h) * P, *dth = dt + b * T * H + h;
        const float *Bg = B + b * T * G * N + g * N, *Cg = C + b * T * G * N + g * N;
        float *yh = y + (b * T * H + h) * P;
#if HAVE_X86
        if (use_avx2) {
            ssd_head_avx2(Sh, xh, dth, A2, D[h], Bg, Cg, yh, T, H * P, H, G * N, P, N);
            continue;
        }
#endif
        ssd_head_ref(Sh, xh, dth, A2, D[h], Bg, Cg, yh, T, H * P, H, G * N, P, N);
    }
}
