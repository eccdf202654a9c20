/* Ternary (BitNet b1.58) products for falconet/quant/ternary.py. Included once by _kernels.c.
 *
 * W is stored as transformers' BitNet integration packs it: uint8 P [R, K] with R = N/4,
 * byte P[r, k] holding code_i = w + 1 in {0, 1, 2} at bits 2i..2i+1 for output row
 * i*R + r. So one byte column serves four output rows at once, and the kernel reads the
 * file's bytes as they are (no repack):
 *
 *   out[m, i*R + r] = sum_k x[m, k] * (code_i(P[r, k]) - 1)
 *                   = sum_k x[m, k] * code_i - sum_k x[m, k]
 *
 * x is int8 (the activations rounded per token); codes stay unsigned, so AVX2's maddubs
 * (u8 x s8 -> s16 pairs, at most 2 * 2 * 128 = 512 in magnitude, no saturation) then
 * madd (-> s32) sum 32 products per instruction pair. Every sum is an integer, so the
 * result does not depend on the order, the path or the thread count: a row alone equals
 * the same row in any batch, and both paths equal PyTorch's float product of the codes.
 */

/* Four rows' sums over K for one activation row: acc[i] = sum x * code_i. */
static void ternary_dot4_ref(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) {
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = 0; k < K; k++) {
        const int32_t v = x[k], b = p[k];
        s0 += v * (b & 3);
        s1 += v * ((b >> 2) & 3);
        s2 += v * ((b >> 4) & 3);
        s3 += v * ((b >> 6) & 3);
    }
    acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3;
}

#if HAVE_X86
static inline int32_t hsum_epi32(__m256i v) AVX2;
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static void ternary_dot4_avx2(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) AVX2;
static void ternary_dot4_avx2(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + k));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(p + k));
        /* 16-bit shifts pull a neighbour's bits into each byte's top; the mask drops them */
        const __m256i c0 = _mm256_and_si256(b, mask);
        const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(b, 2), mask);
        const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(b, 6), mask);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(c0, v), ones));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(c1, v), ones));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_maddubs_epi16(c2, v), ones));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_maddubs_epi16(c3, v), ones));
    }
    int32_t tail[4];
    ternary_dot4_ref(x + k, p + k, K - k, tail);
    acc[0] = hsum_epi32(a0) + tail[0];
    acc[1] = hsum_epi32(a1) + tail[1];
    acc[2] = hsum_epi32(a2) + tail[2];
    acc[3] = hsum_epi32(a3) + tail[3];
}

/* Two activation rows against the same bytes (prefill): the codes are unpacked once for
 * both, which halves the decoding work per product. Same integer sums as two calls. */
static void ternary_dot4x2_avx2(const int8_t *x, const int8_t *x2, const uint8_t *p, int64_t K, int32_t acc[4],
                                int32_t acc2[4]) AVX2;
static void ternary_dot4x2_avx2(const int8_t *x, const int8_t *x2, const uint8_t *p, int64_t K, int32_t acc[4],
                                int32_t acc2[4]) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a[4], b[4];
    for (int i = 0; i < 4; i++) a[i] = b[i] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + k));
        const __m256i v2 = _mm256_loadu_si256((const __m256i *)(x2 + k));
        const __m256i w = _mm256_loadu_si256((const __m256i *)(p + k));
        for (int i = 0; i < 4; i++) {
            const __m256i c = _mm256_and_si256(_mm256_srli_epi16(w, 2 * i), mask);
            a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(c, v), ones));
            b[i] = _mm256_add_epi32(b[i], _mm256_madd_epi16(_mm256_maddubs_epi16(c, v2), ones));
        }
    }
    int32_t tail[4], tail2[4];
    ternary_dot4_ref(x + k, p + k, K - k, tail);
    ternary_dot4_ref(x2 + k, p + k, K - k, tail2);
    for (int i = 0; i < 4; i++) {
        acc[i] = hsum_epi32(a[i]) + tail[i];
        acc2[i] = hsum_epi32(b[i]) + tail2[i];
    }
}
#endif

/* out[M, 4R] (int32) = x[M, K] (int8) @ W.T, W the ternary rows packed in P [R, K]. */
static void ternary_matmul(const int8_t *x, const uint8_t *P, int32_t *out, int64_t M, int64_t K, int64_t R,
                           int threads) {
    const int64_t N = 4 * R;
    int32_t *sums = malloc(sizeof(int32_t) * (size_t)(M ? M : 1));
    if (!sums) return;
    for (int64_t m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += x[m * K + k];
        sums[m] = s;
    }
    /* threads over packed rows: each streams a contiguous slice of P once for all M rows */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *p = P + r * K;
        int64_t m = 0;
#if HAVE_X86
        for (; use_avx2 && m + 2 <= M; m += 2) {
            int32_t acc[4], acc2[4];
            ternary_dot4x2_avx2(x + m * K, x + (m + 1) * K, p, K, acc, acc2);
            for (int i = 0; i < 4; i++) {
                out[m * N + i * R + r] = acc[i] - sums[m];
                out[(m + 1) * N + i * R + r] = acc2[i] - sums[m + 1];
            }
        }
#endif
        for (; m < M; m++) {
            int32_t acc[4];
#if HAVE_X86
            if (use_avx2)
                ternary_dot4_avx2(x + m * K, p, K, acc);
            else
#endif
                ternary_dot4_ref(x + m * K, p, K, acc);
            for (int i = 0; i < 4; i++) out[m * N + i * R + r] = acc[i] - sums[m];
        }
    }
    free(sums);
}
