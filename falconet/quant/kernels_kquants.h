/* K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) times activations rounded to Q8_K.
 * Included once by _kernels.c, after its drivers (whose row chunks and thread schedule
 * kq_gemm shares).
 *
 * A K-quant super-block holds 256 weights in sub-blocks of 16 or 32 with their own
 * integer scales (and, for Q2_K/Q4_K/Q5_K, integer mins) under one or two fp16 scales.
 * Every one of them reads as
 *
 *   w_i = d * s_g * (u_i - o)  -  dmin * m_g          (g = i / 16, u_i >= 0)
 *
 *   Q2_K: u 2 bits, s, m 4 bits            Q3_K: u 3 bits, o = 4, s 6 bits signed
 *   Q4_K: u 4 bits, s, m 6 bits per 32     Q5_K: u 5 bits, s, m 6 bits per 32
 *   Q6_K: u 6 bits, o = 32, s int8
 *
 * The activations are rounded per 256 values as llama.cpp's quantize_row_q8_K_ref does
 * (x ~ dx * q with dx = 1/(-127/max), q = nearest_int(-127/max * x), max the signed
 * value of largest magnitude) and carry bsums, the sums of each 16 q's. Then one
 * super-block's dot product is exactly two integers,
 *
 *   sumi = sum_g s_g * (sum_{i in g} u_i q_i  -  o * bsum_g),   summ = sum_g m_g * bsum_g,
 *
 * and two float steps, acc += (d*dx) * sumi - (dmin*dx) * summ. The AVX2 path computes
 * the same two integers (maddubs for u*q, madd with the scales, integer sums: exact in
 * any order) and the same float steps in the same order as the portable path, so the
 * two agree bit for bit; and since every activation row runs those steps alone, a batch
 * equals each row sent by itself. The weights stay in the GGUF file's blocks, never
 * dequantized; Q4_K's are permuted into 8-row tiles (kernels_kq_x8.h) with the same bits.
 */

/* block layouts and sizes: kernels_kblocks.h */

/* ---- activations to Q8_K -------------------------------------------------------- */

/* One row of K values (K % 256 == 0) -> K/256 Q8_K blocks, as quantize_row_q8_K_ref:
 * the scale is taken from the signed extreme, so it maps to -127 exactly; ties round to
 * even (nearest_int's 1.5*2^23 trick, here nearbyintf in the default rounding mode). */
static void quantize_q8_K_ref(const float *x, block_q8_K *out, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int i = 0; i < QK_K; i++) {
            if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
        }
        block_q8_K *y = out + b;
        if (amax == 0.0f) {
            memset(y, 0, sizeof(*y));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int i = 0; i < QK_K; i++) {
            const int v = (int)nearbyintf(iscale * x[i]);
            y->qs[i] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += y->qs[16 * g + i];
            y->bsums[g] = (int16_t)sum;
        }
        y->d = 1.0f / iscale;
    }
}

/* ---- weight super-blocks in one form -------------------------------------------- */

/* A super-block as u[256] (unsigned), s[16], m[16] per 16 values, the offset o, d, dmin. */
typedef struct { uint8_t u[QK_K]; int16_t s[16], m[16]; int o; float d, dmin; } kq_unpacked;

/* Q4_K/Q5_K's 12 scale bytes -> 6-bit scale and min of the 8 sub-blocks of 32. */
static inline void scale_min_k4(const uint8_t *q, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q3_K's 12 scale bytes -> 16 signed scales: low 4 bits from byte g % 8 (its low nibble
 * for g < 8, high for g >= 8), top 2 bits from byte 8 + g % 4 (bits 2*(g / 4)), less 32. */
static inline int scale_q3_K(const uint8_t *q, int g) {
    const int lo = (q[g % 8] >> (4 * (g / 8))) & 15, hi = (q[8 + g % 4] >> (2 * (g / 4))) & 3;
    return (lo | hi << 4) - 32;
}

static void kq_unpack(int type, const uint8_t *block, kq_unpacked *k) {
    memset(k->m, 0, sizeof(k->m));
    k->o = 0;
    k->dmin = 0.0f;
    switch (type) {
    case T_Q2_K: {
        const block_q2_K *w = (const block_q2_K *)block;
        for (int h = 0; h < 2; h++)  /* half h: 32 bytes, 4 values of 2 bits each */
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) k->u[128 * h + 32 * j + l] = (w->qs[32 * h + l] >> (2 * j)) & 3;
        for (int g = 0; g < 16; g++) { k->s[g] = w->scales[g] & 15; k->m[g] = w->scales[g] >> 4; }
        k->d = half_table[w->d];
        k->dmin = half_table[w->dmin];
        break;
    }
    case T_Q3_K: {
        const block_q3_K *w = (const block_q3_K *)block;
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++)
                    k->u[128 * h + 32 * j + l] = ((w->qs[32 * h + l] >> (2 * j)) & 3) |
                                                 ((w->hmask[l] >> (4 * h + j)) & 1) << 2;
        for (int g = 0; g < 16; g++) k->s[g] = (int16_t)scale_q3_K(w->scales, g);
        k->o = 4;
        k->d = half_table[w->d];
        break;
    }
    case T_Q4_K:
    case T_Q5_K: {
        const int q5 = type == T_Q5_K;
        const block_q4_K *w4 = (const block_q4_K *)block;
        const block_q5_K *w5 = (const block_q5_K *)block;
        const uint8_t *qs = q5 ? w5->qs : w4->qs, *scales = q5 ? w5->scales : w4->scales;
        for (int c = 0; c < 4; c++) /* chunk c: sub-blocks 2c (low nibbles), 2c+1 (high) */
            for (int l = 0; l < 32; l++) {
                k->u[64 * c + l] = qs[32 * c + l] & 15;
                k->u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
                if (q5) {
                    k->u[64 * c + l] |= ((w5->qh[l] >> (2 * c)) & 1) << 4;
                    k->u[64 * c + 32 + l] |= ((w5->qh[l] >> (2 * c + 1)) & 1) << 4;
                }
            }
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            scale_min_k4(scales, j, &sc, &mn);
            k->s[2 * j] = k->s[2 * j + 1] = (int16_t)sc;
            k->m[2 * j] = k->m[2 * j + 1] = (int16_t)mn;
        }
        k->d = half_table[q5 ? w5->d : w4->d];
        k->dmin = half_table[q5 ? w5->dmin : w4->dmin];
        break;
    }
    default: { /* T_Q6_K */
        const block_q6_K *w = (const block_q6_K *)block;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w->ql + 64 * h, *qh = w->qh + 32 * h;
            for (int l = 0; l < 32; l++) {
                uint8_t *u = k->u + 128 * h + l;
                u[0] = (ql[l] & 15) | ((qh[l] >> 0) & 3) << 4;
                u[32] = (ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4;
                u[64] = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
                u[96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
            }
        }
        for (int g = 0; g < 16; g++) k->s[g] = w->scales[g];
        k->o = 32;
        k->d = half_table[w->d];
    }
    }
}

/* The one float step per super-block and activation row, shared by both paths. */
static inline float kq_step(float acc, float d, float dmin, float dx, int32_t sumi, int32_t summ) {
    return acc + ((d * dx) * (float)sumi - (dmin * dx) * (float)summ);
}

static void kq_rows_ref(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1, int64_t nb,
                        const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    const size_t bb = kq_block_bytes(type);
    kq_unpacked k;
    for (int64_t n = n0; n < n1; n++) {
        float acc[MAX_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            kq_unpack(type, W + n * row_bytes + b * bb, &k);
            for (int64_t r = 0; r < M; r++) {
                const block_q8_K *x = xq + r * nb + b;
                int32_t sumi = 0, summ = 0;
                for (int g = 0; g < 16; g++) {
                    int32_t dot = 0;
                    for (int i = 16 * g; i < 16 * g + 16; i++) dot += k.u[i] * x->qs[i];
                    sumi += k.s[g] * (dot - k.o * x->bsums[g]);
                    summ += k.m[g] * x->bsums[g];
                }
                acc[r] = kq_step(acc[r], k.d, k.dmin, x->d, sumi, summ);
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = acc[r];
    }
}

/* ---- AVX2 ----------------------------------------------------------------------- */
#if HAVE_X86

AVX2 static void quantize_q8_K_avx2(const float *x, block_q8_K *out, int64_t nb) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < nb; b++, x += QK_K) {
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < QK_K / 8; j++) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + 8 * j), absmask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        block_q8_K *y = out + b;
        if (amax == 0.0f) {
            memset(y, 0, sizeof(*y));
            continue;
        }
        float max = 0.0f; /* the first value of largest magnitude, with its sign */
        for (int i = 0; i < QK_K; i++)
            if (fabsf(x[i]) == amax) { max = x[i]; break; }
        const float iscale = -127.0f / max;
        const __m256 vs = _mm256_set1_ps(iscale);
        for (int j = 0; j < QK_K / 32; j++) {
            __m256i i32[4];
            for (int k = 0; k < 4; k++)
                i32[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * j + 8 * k), vs),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* int32 -> int8 (|v| <= 127: the packs never saturate), lane order restored */
            __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(y->qs + 32 * j), p8);
            /* the two 16-value sums: widen to int16, pair-sum, then fold */
            __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p8);
            __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1)); /* 4 per 16 values */
            __m128i lo = _mm256_castsi256_si128(s32), hi = _mm256_extracti128_si256(s32, 1);
            lo = _mm_hadd_epi32(lo, hi);  /* a0+a1, a2+a3, b0+b1, b2+b3 */
            lo = _mm_hadd_epi32(lo, lo);
            y->bsums[2 * j] = (int16_t)_mm_cvtsi128_si32(lo);
            y->bsums[2 * j + 1] = (int16_t)_mm_extract_epi32(lo, 1);
        }
        y->d = 1.0f / iscale;
    }
}

/* Integer sum of 8 int32 lanes (exact). */
AVX2 static inline __attribute__((always_inline)) int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* A super-block in registers: u as 8 x 32 unsigned bytes (values 32k..32k+31 in u[k]),
 * sc[k] the int16 scales of those 32 values (lanes 0-7: group 2k, 8-15: group 2k+1),
 * s16/m16 the 16 scales and mins as int16, offset o. */
typedef struct { __m256i u[8], sc[8], s16, m16; int o; float d, dmin; } kq_regs;

/* From the 16 scale bytes (one per 16 values; int8, or unsigned below 64) to the int16
 * vectors kq_dot uses: sc[k] repeats byte 2k in its low 8 lanes and 2k+1 in its high 8. */
AVX2 static inline __attribute__((always_inline)) void kq_scales(kq_regs *k, __m128i s8) {
    for (int j = 0; j < 8; j++) {
        const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (2 * j + 1), 0x0101010101010101LL * (2 * j));
        k->sc[j] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s8, pick));
    }
    k->s16 = _mm256_cvtepi8_epi16(s8);
}

AVX2 static inline __attribute__((always_inline)) void kq_load(int type, const uint8_t *block, kq_regs *k) {
    const __m256i low2 = _mm256_set1_epi8(3), low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m128i nib = _mm_set1_epi8(15);
    k->o = 0;
    k->dmin = 0.0f;
    k->m16 = _mm256_setzero_si256();
    switch (type) {
    case T_Q2_K: {
        const block_q2_K *w = (const block_q2_K *)block;
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));
            for (int j = 0; j < 4; j++) k->u[4 * h + j] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), low2);
        }
        const __m128i sm = _mm_loadu_si128((const __m128i *)w->scales); /* min << 4 | scale */
        kq_scales(k, _mm_and_si128(sm, nib));
        k->m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), nib));
        k->d = _cvtsh_ss(w->d);
        k->dmin = _cvtsh_ss(w->dmin);
        break;
    }
    case T_Q3_K: {
        const block_q3_K *w = (const block_q3_K *)block;
        const __m256i hm = _mm256_loadu_si256((const __m256i *)w->hmask);
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + j), one);
                k->u[4 * h + j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), low2),
                                                  _mm256_slli_epi16(hb, 2));
            }
        }
        /* scale_q3_K for all 16: low nibbles of bytes 0-7 then their high nibbles; top
         * bits from bytes 8-11, bits 2*(g / 4) */
        uint32_t top;
        memcpy(&top, w->scales + 8, 4);
        const __m128i b8 = _mm_loadl_epi64((const __m128i *)w->scales);
        const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(b8, nib), _mm_and_si128(_mm_srli_epi16(b8, 4), nib));
        const __m128i hi = _mm_set_epi32((int)((top >> 6) & 0x03030303u), (int)((top >> 4) & 0x03030303u),
                                         (int)((top >> 2) & 0x03030303u), (int)(top & 0x03030303u));
        kq_scales(k, _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32)));
        k->o = 4;
        k->d = _cvtsh_ss(w->d);
        break;
    }
    case T_Q4_K:
    case T_Q5_K: {
        const int q5 = type == T_Q5_K;
        const block_q4_K *w4 = (const block_q4_K *)block;
        const block_q5_K *w5 = (const block_q5_K *)block;
        const uint8_t *qs = q5 ? w5->qs : w4->qs, *scales = q5 ? w5->scales : w4->scales;
        const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)w5->qh) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            if (q5) { /* bit j of qh[l]: the fifth bit of value l of sub-block j */
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
            }
            k->u[2 * c] = lo;
            k->u[2 * c + 1] = hi;
        }
        /* scale_min_k4 for all 8 at once, on the 12 bytes as words a, b, c: sub-blocks
         * 0-3 are the low 6 bits of a (scales) and b (mins); 4-7 take c's low (scales)
         * or high (mins) nibbles and the top 2 bits of a or b as bits 4-5 */
        uint32_t a, b, c;
        memcpy(&a, scales, 4);
        memcpy(&b, scales + 4, 4);
        memcpy(&c, scales + 8, 4);
        const uint32_t sc_lo = a & 0x3f3f3f3fu, sc_hi = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
        const uint32_t mn_lo = b & 0x3f3f3f3fu, mn_hi = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
        const __m128i sc8 = _mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo), mn8 = _mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo);
        /* 8 scales as int16 in both lanes; sc[j] repeats scale j (bytes 2j, 2j+1) */
        const __m256i s16x2 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc8));
        for (int j = 0; j < 8; j++) k->sc[j] = _mm256_shuffle_epi8(s16x2, _mm256_set1_epi16((short)(0x0100 + 0x0202 * j)));
        k->m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
        k->d = _cvtsh_ss(q5 ? w5->d : w4->d);
        k->dmin = _cvtsh_ss(q5 ? w5->dmin : w4->dmin);
        break;
    }
    default: { /* T_Q6_K */
        const block_q6_K *w = (const block_q6_K *)block;
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
            const __m256i low[4] = {_mm256_and_si256(ql0, low4), _mm256_and_si256(ql1, low4),
                                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4)};
            for (int j = 0; j < 4; j++) {
                __m256i top = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), low2);
                k->u[4 * h + j] = _mm256_or_si256(low[j], _mm256_slli_epi16(top, 4));
            }
        }
        kq_scales(k, _mm_loadu_si128((const __m128i *)w->scales));
        k->o = 32;
        k->d = _cvtsh_ss(w->d);
    }
    }
}

/* sumi and summ of one super-block against one Q8_K block (see the top of the file).
 * u * q pairs stay in int16 (at most 2 * 63 * 127), the scaled sums in int32. */
AVX2 static inline __attribute__((always_inline)) void kq_dot(const kq_regs *k, const block_q8_K *x, int has_min,
                                                             int32_t *sumi, int32_t *summ) {
    __m256i acc = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        __m256i p16 = _mm256_maddubs_epi16(k->u[j], _mm256_loadu_si256((const __m256i *)(x->qs + 32 * j)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, k->sc[j]));
    }
    const __m256i bsums = _mm256_loadu_si256((const __m256i *)x->bsums);
    if (k->o) /* sum_g s_g * o * bsum_g, o = 4 or 32 */
        acc = _mm256_sub_epi32(acc, _mm256_sll_epi32(_mm256_madd_epi16(bsums, k->s16), _mm_cvtsi32_si128(k->o == 4 ? 2 : 5)));
    if (!has_min) {
        *sumi = hsum_i32(acc);
        *summ = 0;
        return;
    }
    /* both sums in one reduction: [a01 a23 m01 m23 | a45 a67 m45 m67] -> [A M A M] */
    const __m256i pairs = _mm256_hadd_epi32(acc, _mm256_madd_epi16(bsums, k->m16));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    t = _mm_hadd_epi32(t, t);
    *sumi = _mm_cvtsi128_si32(t);
    *summ = _mm_extract_epi32(t, 1);
}

AVX2 static inline __attribute__((always_inline)) void kq_row_avx2(int type, const uint8_t *row, int64_t nb,
                                                                  const block_q8_K *xq, int64_t M, int64_t N,
                                                                  float *y) {
    const size_t bb = kq_block_bytes(type);
    const int has_min = type == T_Q2_K || type == T_Q4_K || type == T_Q5_K;
    float acc[MAX_ROWS];
    for (int64_t r = 0; r < M; r++) acc[r] = 0.0f;
    kq_regs k;
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch((const char *)(row + (b + 2) * bb), _MM_HINT_T0);
        kq_load(type, row + b * bb, &k);
        for (int64_t r = 0; r < M; r++) {
            const block_q8_K *x = xq + r * nb + b;
            int32_t sumi, summ;
            kq_dot(&k, x, has_min, &sumi, &summ);
            acc[r] = kq_step(acc[r], k.d, k.dmin, x->d, sumi, summ);
        }
    }
    for (int64_t r = 0; r < M; r++) y[r * N] = acc[r];
}

#define KQ_ROW(T)                                                                                  \
    (M == 1 ? kq_row_avx2(T, W + n * row_bytes, nb, xq, 1, N, y + n)                                \
            : kq_row_avx2(T, W + n * row_bytes, nb, xq, M, N, y + n))

AVX2 static void kq_rows_avx2(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1, int64_t nb,
                              const block_q8_K *xq, int64_t M, int64_t N, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        switch (type) {
        case T_Q2_K: KQ_ROW(T_Q2_K); break;
        case T_Q3_K: KQ_ROW(T_Q3_K); break;
        case T_Q4_K: KQ_ROW(T_Q4_K); break;
        case T_Q5_K: KQ_ROW(T_Q5_K); break;
        default: KQ_ROW(T_Q6_K);
        }
    }
}
#endif

/* ---- driver --------------------------------------------------------------------- */

/* y[M, N] = x[M, K] @ W.T, any M. Each thread takes whole runs of weight rows
 * (a contiguous stretch of the file, streamed once) and passes every chunk of MAX_ROWS
 * activation rows over them while they sit in cache, so a prompt reads the weights
 * from memory once; how the rows are chunked never changes a row's arithmetic.
 * Returns -1 when the activation buffer cannot be allocated. */
static int kq_gemm(int type, const uint8_t *W, int64_t N, int64_t K, const float *x, int64_t M, float *y,
                   int threads) {
    const int64_t nb = K / QK_K;
    const size_t row_bytes = (size_t)nb * kq_block_bytes(type);
    block_q8_K *xq = malloc(sizeof(block_q8_K) * (size_t)(M * nb > 0 ? M * nb : 1));
    if (!xq) return -1;
    (void)threads;
    /* a decode step's one row is rounded inline: a parallel region costs microseconds */
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 4)
    for (int64_t r = 0; r < M; r++) {
#if HAVE_X86
        if (use_avx2) { quantize_q8_K_avx2(x + r * K, xq + r * nb, nb); continue; }
#endif
        quantize_q8_K_ref(x + r * K, xq + r * nb, nb);
    }
    /* contiguous runs handed out as threads free up, as the x8 GEMV does (_kernels.c):
     * long enough for the prefetchers, and a thread that loses its core to another
     * process takes fewer runs instead of holding the step up. A row's arithmetic never
     * depends on the schedule. */
    int64_t per = N / ((int64_t)threads * X8_UNITS_PER_THREAD);
    per = per < ROW_CHUNK ? ROW_CHUNK : per;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_units(N, per); c++) {
        int64_t n0, n1;
        unit_bounds(c, N, per, &n0, &n1);
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t m = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
#if HAVE_X86
            if (use_avx2) {
                kq_rows_avx2(type, W, row_bytes, n0, n1, nb, xq + r0 * nb, m, N, y + r0 * N);
                continue;
            }
#endif
            kq_rows_ref(type, W, row_bytes, n0, n1, nb, xq + r0 * nb, m, N, y + r0 * N);
        }
    }
    free(xq);
    return 0;
}

/* The Q8_K rounding alone (tests check it against llama.cpp's reference): x[M, K] ->
 * M * K/256 blocks of 292 bytes. */
static void kq_quantize_activations(const float *x, int64_t M, int64_t K, block_q8_K *out) {
    const int64_t nb = K / QK_K;
    for (int64_t r = 0; r < M; r++) {
#if HAVE_X86
        if (use_avx2) { quantize_q8_K_avx2(x + r * K, out + r * nb, nb); continue; }
#endif
        quantize_q8_K_ref(x + r * K, out + r * nb, nb);
    }
}
