/* Row-major AVX2 kernels for GGML blocks: one weight row against up to MAX_ROWS
 * activation rows, plus dequantization. Included once by _kernels.c (one translation
 * unit, so the always_inline helpers fold into each specialised loop). */
/* ---- AVX2 kernels --------------------------------------------------------------- */
#if HAVE_X86

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles are elements 0..15, high ones 16..31. */
AVX2 static inline __attribute__((always_inline)) __m256i nibbles(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* Bit i of 32 bits -> 0x10 in byte i (Q5_0's fifth bit). */
AVX2 static inline __attribute__((always_inline)) __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                             0x0101010101010101, 0x0000000000000000);
    const __m256i select = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* Weight block -> 32 int8 in a register with its scale d (and Q4_1's min m): unsigned
 * quants for the 4/5-bit formats, so their dot products need no sign juggling (the
 * Q4_0/Q5_0 offset comes off in dot_offset); signed quants for Q8_0. */
AVX2 static inline __attribute__((always_inline)) __m256i load_block(int type, const uint8_t *row, int64_t b, float *d, float *m) {
    switch (type) {
    case T_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return nibbles(w->qs); /* unsigned; the offset 8 is block_x8.offset */
    }
    case T_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)row + b;
        *d = _cvtsh_ss(w->d);
        *m = _cvtsh_ss(w->m);
        return nibbles(w->qs);
    }
    case T_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return _mm256_or_si256(nibbles(w->qs), fifth_bits(w->qh)); /* unsigned; offset 16 */
    }
    default: {
        const block_q8_0 *w = (const block_q8_0 *)row + b;
        *d = _cvtsh_ss(w->d);
        return _mm256_loadu_si256((const __m256i *)w->qs);
    }
    }
}

/* Sum of 32 products of signed int8, as 8 float partial sums. maddubs takes an unsigned
 * left operand, so the signs move onto the right one (|a| * sign(a)*b). */
AVX2 static inline __attribute__((always_inline)) __m256 dot_signed(__m256i a, __m256i b) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* sum (a - o) * x for unsigned a, from the products a * x less the activation block's
 * precomputed o * x pair sums (zero for Q4_1, whose min is applied in float). */
AVX2 static inline __attribute__((always_inline)) __m256 dot_offset(__m256i a, const block_x8 *x) {
    __m256i p16 = _mm256_maddubs_epi16(a, _mm256_loadu_si256((const __m256i *)x->qs));
    p16 = _mm256_sub_epi16(p16, _mm256_loadu_si256((const __m256i *)x->offset));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

AVX2 static void quantize_x8_avx2(const float *x, block_x8 *out, int64_t nb, int weight_offset) {
    const __m256i vo = _mm256_set1_epi8((char)weight_offset);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < nb; b++, x += QK) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 id = _mm256_set1_ps(amax ? 127.0f / amax : 0.0f);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        /* int32 -> int8, undoing the lane interleave of the packs */
        __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)out[b].qs, p8);
        _mm256_storeu_si256((__m256i *)out[b].offset, _mm256_maddubs_epi16(vo, p8));
        out[b].d = round_to_half(amax / 127.0f);
        out[b].isum = (int32_t)hsum(_mm256_cvtepi32_ps(sum)); /* |sum| <= 4064: exact */
        out[b].s = out[b].d * (float)out[b].isum;
    }
}

/* One weight row against M activation rows. Blocks go in pairs to two accumulators (to
 * hide FMA latency); the arithmetic per activation row does not depend on M, so a batch
 * equals each row alone. Inlined with M = 1 for decode so the accumulators stay in
 * registers. */
AVX2 static inline __attribute__((always_inline)) __m256 dot_block(int type, __m256i w, const block_x8 *x) {
    if (type == T_Q8_0) return dot_signed(w, _mm256_loadu_si256((const __m256i *)x->qs));
    if (type == T_Q4_1) {
        __m256i p16 = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)x->qs));
        return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    }
    return dot_offset(w, x);
}

AVX2 static inline __attribute__((always_inline)) void gemv_row_avx2(
    int type, const uint8_t *row, int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    __m256 a0[MAX_ROWS], a1[MAX_ROWS];
    float macc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) { a0[r] = a1[r] = _mm256_setzero_ps(); macc[r] = 0.0f; }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        float d0, d1, m0 = 0, m1 = 0;
        __m256i w0 = load_block(type, row, b, &d0, &m0);
        __m256i w1 = load_block(type, row, b + 1, &d1, &m1);
        for (int64_t r = 0; r < M; r++) {
            const block_x8 *x0 = xq + r * nb + b, *x1 = x0 + 1;
            a0[r] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x0->d), dot_block(type, w0, x0), a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * x1->d), dot_block(type, w1, x1), a1[r]);
            if (type == T_Q4_1) macc[r] += m0 * x0->s + m1 * x1->s;
        }
    }
    for (; b < nb; b++) {
        float d0, m0 = 0;
        __m256i w0 = load_block(type, row, b, &d0, &m0);
        for (int64_t r = 0; r < M; r++) {
            const block_x8 *x0 = xq + r * nb + b;
            a0[r] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * x0->d), dot_block(type, w0, x0), a0[r]);
            if (type == T_Q4_1) macc[r] += m0 * x0->s;
        }
    }
    for (int64_t r = 0; r < M; r++) y[r * N] = hsum(_mm256_add_ps(a0[r], a1[r])) + macc[r];
}

/* Specialised per format and for M = 1: the format switch and the row loop fold away. */
#define GEMV_ROW(T)                                                                       \
    (M == 1 ? gemv_row_avx2(T, W + n * row_bytes, nb, xq, 1, N, y + n)                   \
            : gemv_row_avx2(T, W + n * row_bytes, nb, xq, M, N, y + n))

AVX2 static void gemv_rows_avx2(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                                int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        switch (type) {
        case T_Q4_0: GEMV_ROW(T_Q4_0); break;
        case T_Q4_1: GEMV_ROW(T_Q4_1); break;
        case T_Q5_0: GEMV_ROW(T_Q5_0); break;
        default: GEMV_ROW(T_Q8_0);
        }
    }
}

AVX2 static void dequant_rows_avx2(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                                   int64_t nb, float *out) {
    /* Bit-exact with GGML's dequantize_row: (q - offset)*d with one rounding, and Q4_1's
     * q*d + m with two. */
    const __m256i offset = _mm256_set1_epi32(type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0);
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * nb * QK;
        for (int64_t b = 0; b < nb; b++) {
            float d, m = 0;
            __m256i q = load_block(type, W + n * row_bytes, b, &d, &m);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
            __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; j++) {
                __m256i i32 = type == T_Q8_0 ? _mm256_cvtepi8_epi32(parts[j]) : _mm256_cvtepu8_epi32(parts[j]);
                __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i32, offset)), vd);
                _mm256_storeu_ps(o + b * QK + 8 * j, type == T_Q4_1 ? _mm256_add_ps(v, vm) : v);
            }
        }
    }
}
#endif
