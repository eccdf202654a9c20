/* RMSNorm, the SwiGLU gate and the rotary embedding for fp32 rows, on the calling thread. Included once by
 * _kernels.c, after kernels_activation.h (tail_mask; the scan kernels' exp2).
 *
 * Why not torch's: in a decode step each is a chain of small ops (RMSNorm: pow, mean,
 * add, rsqrt, mul, mul; the gate: silu, mul), each a dispatch and a temporary, ~40 us
 * per norm and ~25 us per gate for one 2048- or 8192-wide row on the dev VM -- 1.5-2 ms
 * of a Falcon3-1B-shaped step. Here each is one pass.
 *
 * RMSNorm: y = w * (x * r), r = 1 / sqrt(sum(x^2) / n + eps), as transformers'
 * LlamaRMSNorm in fp32. The sum of squares runs in 8 lanes (value i in lane i % 8, a
 * multiply then an add, no FMA) added in one fixed tree, so the AVX2 and portable paths
 * give the same bits and a row's result depends on that row alone. torch sums in
 * another order, so r can differ from its in the last bit.
 *
 * Gate: y = silu(g) * u = g / (1 + exp(-g)) * u, exp from the scan kernels' exp2
 * polynomial (as the erf GELU's): within a few ulp of torch's silu; every value takes
 * the same operations in the vector body and the tail, so its bits never depend on its
 * neighbours.
 */

/* 1 / sqrt(mean + eps) from the 8 lanes of squares, added in one fixed tree */
static float rms_scale_of(const float lane[8], int64_t n, float eps) {
    const float t0 = lane[0] + lane[4], t1 = lane[1] + lane[5], t2 = lane[2] + lane[6], t3 = lane[3] + lane[7];
    const float ss = (t0 + t2) + (t1 + t3);
    return 1.0f / sqrtf(ss / (float)n + eps);
}

static float rms_scale_ref(const float *x, int64_t n, float eps) {
    float lane[8] = {0};
    for (int64_t i = 0; i < n; i++) lane[i % 8] = lane[i % 8] + x[i] * x[i];
    return rms_scale_of(lane, n, eps);
}

static inline float silu_gate_ref(float g, float u) {
    const float e = scan_exp2_ref(-g * EXP_LOG2E);
    return g / (1.0f + e) * u;
}

#if HAVE_X86
AVX2 static float rms_scale_avx2(const float *x, int64_t n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    if (i < n) { /* the missing lanes read 0: adding +0 leaves a lane as it is */
        const __m256 v = _mm256_maskload_ps(x + i, tail_mask((int)(n - i)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float lane[8];
    _mm256_storeu_ps(lane, acc);
    return rms_scale_of(lane, n, eps);
}

AVX2 static void rms_apply_avx2(const float *x, const float *w, float *y, int64_t n, float r) {
    const __m256 rv = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
    for (; i < n; i++) y[i] = w[i] * (x[i] * r);
}

AVX2 static inline __attribute__((always_inline)) __m256 silu_gate_avx2(__m256 g, __m256 u) {
    const __m256 ng = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f)); /* -g, exactly */
    const __m256 e = scan_exp2_avx2(_mm256_mul_ps(ng, _mm256_set1_ps(EXP_LOG2E)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

AVX2 static void rotary_row_avx2(const float *x, const float *c, const float *s, float *y, int64_t half) {
    for (int64_t i = 0; i < half; i += 8) {
        const __m256 lo = _mm256_loadu_ps(x + i), hi = _mm256_loadu_ps(x + half + i);
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + i)),
                                              _mm256_mul_ps(hi, _mm256_loadu_ps(s + i))));
        _mm256_storeu_ps(y + half + i, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + i)),
                                                     _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + i))));
    }
}

AVX2 static void silu_gate_rows_avx2(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, silu_gate_avx2(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        const __m256i mask = tail_mask((int)(n - i));
        _mm256_maskstore_ps(y + i, mask, silu_gate_avx2(_mm256_maskload_ps(g + i, mask), _mm256_maskload_ps(u + i, mask)));
    }
}
#endif

/* y[rows, n] = RMSNorm of x[rows, n] with weight w[n]. */
static void rms_norm_rows(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t m = 0; m < rows; m++, x += n, y += n) {
#if HAVE_X86
        if (use_avx2) {
            rms_apply_avx2(x, w, y, n, rms_scale_avx2(x, n, eps));
            continue;
        }
#endif
        const float r = rms_scale_ref(x, n, eps);
        for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
    }
}

/* y[n] = silu(g[n]) * u[n]. */
static void silu_gate(const float *g, const float *u, float *y, int64_t n) {
#if HAVE_X86
    if (use_avx2) {
        silu_gate_rows_avx2(g, u, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) y[i] = silu_gate_ref(g[i], u[i]);
}

/* NeoX rotary embedding of fp32 heads: y = x * cos + roll(x, D/2) * signed_sin, the
 * products and the sum each rounded as torch's three ops round them (no FMA), so the
 * bits are those of nn.attention.apply_rotary's torch form. x and y are (B, H, T, D) at
 * strides (sb, sh, st, 1) (y laid out as x: what follows may take another path for
 * another layout); cos and signed_sin (B or 1, 1, T, D) at strides (cb, ct, 1). One pass
 * instead of mul, roll (narrow, cat), mul, add. */
static void rotary_rows(const float *x, int64_t sb, int64_t sh, int64_t st, const float *cos, const float *sin,
                        int64_t cb, int64_t ct, float *y, int64_t yb, int64_t yh, int64_t yt, int64_t B, int64_t H,
                        int64_t T, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *xr = x + b * sb + h * sh + t * st, *c = cos + b * cb + t * ct, *s = sin + b * cb + t * ct;
                float *yr = y + b * yb + h * yh + t * yt;
                int64_t i = 0;
#if HAVE_X86
                if (use_avx2 && half % 8 == 0) {
                    rotary_row_avx2(xr, c, s, yr, half);
                    continue;
                }
#endif
                for (; i < half; i++) yr[i] = xr[i] * c[i] + xr[i + half] * s[i];
                for (; i < D; i++) yr[i] = xr[i] * c[i] + xr[i - half] * s[i];
            }
}
