/* Exact-form (erf) GELU for fp32 activations: y = x/2 (1 + erf(x / sqrt 2)). Included once
 * by _kernels.c, after kernels_scan.h (whose exp2 it uses).
 *
 * Why not torch's: its erf GELU always goes through OpenMP, even for the 8192 values of
 * one decode token, and waking the second thread between the matmul kernels cost more
 * than the GELU itself (tens of microseconds each time on the dev VM; 24 per step). This
 * runs on the calling thread.
 *
 * erf(z) for z >= 0 is Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ... a5)) exp(-z^2)
 * with t = 1 / (1 + p z), absolute error below 1.5e-7 (odd: erf(-z) = -erf(z)); the exp is
 * the scan kernels' exp2 polynomial. So y is within about 1e-7 |x| of the exact GELU,
 * as close as torch's own (Sleef) is in fp32. Every value takes the same operations, in
 * the vector body and the tail alike (a masked vector), and the portable path does the
 * same operations with C's fmaf: a value's bits never depend on its neighbours.
 */

#define GELU_P 0.3275911f
#define GELU_A1 0.254829592f
#define GELU_A2 -0.284496736f
#define GELU_A3 1.421413741f
#define GELU_A4 -1.453152027f
#define GELU_A5 1.061405429f
#define GELU_RSQRT2 0.70710678118654752f

static inline float gelu_ref(float x) {
    const float z = fabsf(x * GELU_RSQRT2), t = 1.0f / fmaf(GELU_P, z, 1.0f);
    float p = GELU_A5;
    p = fmaf(p, t, GELU_A4);
    p = fmaf(p, t, GELU_A3);
    p = fmaf(p, t, GELU_A2);
    p = fmaf(p, t, GELU_A1);
    const float e = scan_exp2_ref(-(z * z) * EXP_LOG2E);
    const float erf_z = 1.0f - (p * t) * e;
    const float erf_x = x < 0.0f ? -erf_z : erf_z;
    return (0.5f * x) * (1.0f + erf_x);
}

#if HAVE_X86
AVX2 static inline __attribute__((always_inline)) __m256 gelu_avx2(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 z = _mm256_andnot_ps(sign, _mm256_mul_ps(x, _mm256_set1_ps(GELU_RSQRT2)));
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(GELU_P), z, _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(GELU_A5);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(GELU_A4));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(GELU_A3));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(GELU_A2));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(GELU_A1));
    const __m256 nz2 = _mm256_xor_ps(_mm256_mul_ps(z, z), sign); /* -(z*z), exactly */
    const __m256 e = scan_exp2_avx2(_mm256_mul_ps(nz2, _mm256_set1_ps(EXP_LOG2E)));
    const __m256 erf_z = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(_mm256_mul_ps(p, t), e));
    /* x < 0: flip erf's sign (x's sign bit, for x = -0 too: erf(-0) = -0 either way) */
    const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 erf_x = _mm256_xor_ps(erf_z, _mm256_and_ps(neg, sign));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf_x));
}

AVX2 static void gelu_rows_avx2(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu_avx2(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i mask = tail_mask((int)(n - i));
        _mm256_maskstore_ps(y + i, mask, gelu_avx2(_mm256_maskload_ps(x + i, mask)));
    }
}
#endif

static void gelu_erf(const float *x, float *y, int64_t n) {
#if HAVE_X86
    if (use_avx2) {
        gelu_rows_avx2(x, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) y[i] = gelu_ref(x[i]);
}
