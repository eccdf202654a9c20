/* K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256-value super-blocks), byte for
 * byte llama.cpp's reference ones without an importance matrix (quantize_row_q*_K_ref in
 * ggml-quants.c), which is what llama-quantize writes for a Q4_K_M file.
 *
 * Byte-exactness rests on doing the same float32 operations in the same order:
 * - every sum is accumulated left to right in float32 (no reassociation: no -ffast-math,
 *   and no fused multiply-adds: setup.py builds with -ffp-contract=off, as GGML's
 *   reference C is built for plain x86-64 without FMA);
 * - products keep the reference's grouping: w*x*l is (w*x)*l, with an int quant
 *   converted to float at the multiply;
 * - rounding to an int is GGML's nearest_int (add 1.5*2^23 and read the mantissa bits:
 *   round half to even for |v| < 2^22, and the same wrapped bits beyond);
 * - narrowing an int into a uint8/int8 scale wraps as the reference's assignment does;
 * - scales are stored as fp16 rounded to nearest even, and read back as that fp16.
 * The searches themselves (the per-sub-block least-squares scale and min of Q2/4/5_K,
 * the rmse-weighted symmetric scale of Q6_K, Q3_K's iterative refinement) are
 * described where they are defined.
 *
 * Included once by _kernels.c; plain portable C (no SIMD, no F16C). */

#define K_GROUP_MAX_EPS 1e-15f /* a sub-block with max |x| below this is all zeros */

/* block layouts: kernels_kblocks.h */

/* fp32 -> fp16, round to nearest even (what F16C and GGML's software path both give). */
static uint16_t kq_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffff;
    if (a >= 0x7f800000) return sign | (a > 0x7f800000 ? 0x7e00 : 0x7c00);
    if (a >= 0x477ff000) return sign | 0x7c00; /* >= 65520 rounds past 65504 */
    if (a < 0x38800000) {                        /* below 2^-14: a subnormal half */
        float v;
        memcpy(&v, &a, 4);
        return sign | (uint16_t)lrintf(v * 16777216.0f); /* exact scaling by 2^24 */
    }
    /* drop 13 mantissa bits with round-half-even; a carry moves into the exponent */
    return sign | (uint16_t)((a + 0x0fff + ((a >> 13) & 1) - 0x38000000) >> 13);
}

static inline float kq_float(uint16_t h) { return half_table[h]; }
static inline int kq_is_inf(uint16_t h) { return (h & 0x7fff) == 0x7c00; }

/* GGML's nearest_int: the float's mantissa after adding 1.5 * 2^23. */
static inline int kq_round(float v) {
    const float s = v + 12582912.f;
    int32_t i;
    memcpy(&i, &s, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int kq_clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Asymmetric fit x ~ scale*L + min (min <= 0, L in 0..nmax) for Q2_K/Q4_K/Q5_K: start from
 * the min/max grid, then try nstep+1 stretched grids (iscale = (rmin + rdelta*is + nmax) /
 * range), fitting scale and min by weighted least squares on each candidate's L and keeping
 * the one with the smallest weighted error (squared, or absolute with use_mad). Returns the
 * scale; *neg_min = -min. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *neg_min,
                           float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)kq_clamp(kq_round(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += w[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            const int l = kq_clamp(kq_round(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                error += w[i] * diff;
            }
            if (error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

/* The signed value of largest magnitude (first on ties) and that magnitude. */
static inline float signed_max(int n, const float *x, float *amax) {
    float max = 0, a = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > a) {
            a = ax;
            max = x[i];
        }
    }
    *amax = a;
    return max;
}

/* Q6_K's symmetric fit (make_qx_quants, rmse_type 1, weights x^2): L in 0..2*nmax-1 with
 * x ~ scale*(L - nmax); the x^2-weighted least-squares scale of the grid from max, kept
 * against 18 neighbouring grids (nmax +- 0.1*is) by the best sumlx^2/suml2. */
static float fit_symmetric(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_max(n, x, &amax);
    if (amax < K_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = kq_clamp(kq_round(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            const int l = kq_clamp(kq_round(iscale * x[i]), -nmax, nmax - 1);
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) L[i] = (int8_t)(nmax + kq_clamp(kq_round(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's symmetric fit (make_q3_quants with rmse): the grid from max, then up to 5 passes
 * that move single quants to x*sl2/slx when that raises sumlx^2/suml2 (weights x^2). */
static float fit_q3(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_max(n, x, &amax);
    if (amax < K_GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = kq_clamp(kq_round(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                const int l = kq_clamp(kq_round(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (l != L[i]) {
                    slx += w * x[i] * l;
                    sl2 += w * l * l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Four 2-bit quants per byte: byte l of each 32-byte group holds values l, l+32, l+64, l+96
 * of its 128-value half. */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int h = 0; h < QK_K; h += 128)
        for (int l = 0; l < 32; l++)
            qs[h / 4 + l] = (uint8_t)(L[h + l] | (L[h + l + 32] << 2) | (L[h + l + 64] << 4) | (L[h + l + 96] << 6));
}

/* Q4_K/Q5_K's 6-bit scales and mins for sub-block j (GGML's get_scale_min_k4 layout). */
static void pack_scale_min(uint8_t *s, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j] |= (uint8_t)((lm >> 4) << 6);
    }
}

static void unpack_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

static int quantize_q2_K(const float *x, block_q2_K *y) {
    uint8_t L[QK_K];
    float w[16], mins[16], scales[16];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; j++) {
        for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * j + l]);
        scales[j] = fit_scale_min(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float q4scale = 15.f;
    if (max_scale > 0) {
        const float iscale = q4scale / max_scale;
        for (int j = 0; j < 16; j++) y->scales[j] = (uint8_t)kq_round(iscale * scales[j]);
        y->d = kq_half(max_scale / q4scale);
    } else {
        memset(y->scales, 0, 16);
        y->d = kq_half(0.f);
    }
    if (max_min > 0) {
        const float iscale = q4scale / max_min;
        for (int j = 0; j < 16; j++) y->scales[j] |= (uint8_t)(kq_round(iscale * mins[j]) << 4);
        y->dmin = kq_half(max_min / q4scale);
    } else {
        y->dmin = kq_half(0.f);
    }
    for (int j = 0; j < 16; j++) {
        const float d = kq_float(y->d) * (y->scales[j] & 0xF);
        if (!d) continue; /* the sub-block keeps its fitted quants */
        const float dm = kq_float(y->dmin) * (y->scales[j] >> 4);
        for (int i = 0; i < 16; i++) L[16 * j + i] = (uint8_t)kq_clamp(kq_round((x[16 * j + i] + dm) / d), 0, 3);
    }
    pack_2bit(L, y->qs);
    return kq_is_inf(y->d) || kq_is_inf(y->dmin);
}

static int quantize_q3_K(const float *x, block_q3_K *y) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; j++) {
        scales[j] = fit_q3(16, 4, x + 16 * j, L + 16 * j);
        const float a = fabsf(scales[j]);
        if (a > amax) {
            amax = a;
            max_scale = scales[j];
        }
    }
    memset(y->scales, 0, 12);
    if (max_scale) {
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; j++) {
            int8_t l = (int8_t)kq_round(iscale * scales[j]);
            l = (int8_t)(kq_clamp(l, -32, 31) + 32);
            /* 6-bit scale: low nibble in bytes 0-7, two high bits in bytes 8-11 */
            if (j < 8)
                y->scales[j] = l & 0xF;
            else
                y->scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            y->scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        y->d = kq_half(1 / iscale);
    } else {
        y->d = kq_half(0.f);
    }
    for (int j = 0; j < 16; j++) {
        int8_t sc = (int8_t)(j < 8 ? y->scales[j] & 0xF : y->scales[j - 8] >> 4);
        sc = (int8_t)((sc | (((y->scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        const float d = kq_float(y->d) * sc;
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(kq_clamp(kq_round(x[16 * j + i] / d), -4, 3) + 4);
    }
    /* the third bit of value j goes to bit j/32 of hmask[j % 32] */
    memset(y->hmask, 0, 32);
    uint8_t U[QK_K];
    for (int j = 0; j < QK_K; j++) {
        U[j] = (uint8_t)L[j];
        if (L[j] > 3) {
            y->hmask[j % 32] |= (uint8_t)(1 << (j / 32));
            U[j] = (uint8_t)(L[j] - 4);
        }
    }
    pack_2bit(U, y->qs);
    return kq_is_inf(y->d);
}

/* Q4_K (nmax 15) and Q5_K (nmax 31): eight 32-value sub-blocks fitted asymmetrically with
 * weights av_x + |x|, their scales and mins quantized to 6 bits against the largest. */
static void fit_q45(const float *x, int nmax, float rmin, float rdelta, int nstep, uint8_t *L, uint8_t *packed,
                    uint16_t *d, uint16_t *dmin) {
    float w[32], mins[8], scales[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xs[l]);
        scales[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, &mins[j], rmin, rdelta, nstep, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)kq_round(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)kq_round(inv_min * mins[j]);
        pack_scale_min(packed, j, ls < 63 ? ls : 63, lm < 63 ? lm : 63);
    }
    *d = kq_half(max_scale / 63.f);
    *dmin = kq_half(max_min / 63.f);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        unpack_scale_min(packed, j, &sc, &m);
        const float ds = kq_float(*d) * sc;
        if (!ds) continue; /* the sub-block keeps its fitted quants */
        const float dm = kq_float(*dmin) * m;
        for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)kq_clamp(kq_round((x[32 * j + i] + dm) / ds), 0, nmax);
    }
}

static int quantize_q4_K(const float *x, block_q4_K *y) {
    uint8_t L[QK_K];
    memset(y->scales, 0, 12);
    fit_q45(x, 15, -1.f, 0.1f, 20, L, y->scales, &y->d, &y->dmin);
    /* each 32 bytes hold sub-block 2c in the low nibbles and 2c+1 in the high ones */
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + l + 32] << 4));
    return kq_is_inf(y->d) || kq_is_inf(y->dmin);
}

static int quantize_q5_K(const float *x, block_q5_K *y) {
    uint8_t L[QK_K];
    memset(y->scales, 0, 12);
    fit_q45(x, 31, -0.5f, 0.1f, 15, L, y->scales, &y->d, &y->dmin);
    /* Q4_K's nibbles, plus the fifth bit of sub-block j's value l in bit j of qh[l] */
    memset(y->qh, 0, 32);
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            const int lo = L[64 * c + l], hi = L[64 * c + l + 32];
            y->qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            y->qs[32 * c + l] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
        }
    }
    return kq_is_inf(y->d) || kq_is_inf(y->dmin);
}

static int quantize_q6_K(const float *x, block_q6_K *y) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int j = 0; j < 16; j++) {
        scales[j] = fit_symmetric(16, 32, x + 16 * j, L + 16 * j);
        const float a = fabsf(scales[j]);
        if (a > max_abs_scale) {
            max_abs_scale = a;
            max_scale = scales[j];
        }
    }
    if (max_abs_scale < K_GROUP_MAX_EPS) {
        memset(y, 0, sizeof *y);
        y->d = kq_half(0.f);
        return 0;
    }
    const float iscale = -128.f / max_scale;
    y->d = kq_half(1 / iscale);
    for (int j = 0; j < 16; j++) {
        const int s = kq_round(iscale * scales[j]);
        y->scales[j] = (int8_t)(s < 127 ? s : 127);
    }
    for (int j = 0; j < 16; j++) {
        const float d = kq_float(y->d) * y->scales[j];
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(kq_clamp(kq_round(x[16 * j + i] / d), -32, 31) + 32);
    }
    /* per 128-value half: low nibbles of values l and l+64 share ql[l], of l+32 and l+96
     * share ql[l+32]; the four top bit pairs go to qh[l] */
    for (int h = 0; h < 2; h++) {
        const uint8_t *q = (const uint8_t *)L + 128 * h;
        uint8_t *ql = y->ql + 64 * h, *qh = y->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((q[l] & 0xF) | ((q[l + 64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4));
            qh[l] = (uint8_t)((q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6));
        }
    }
    return kq_is_inf(y->d);
}

static int kquantize_block(int type, const float *x, uint8_t *out) {
    switch (type) {
    case T_Q2_K: return quantize_q2_K(x, (block_q2_K *)out);
    case T_Q3_K: return quantize_q3_K(x, (block_q3_K *)out);
    case T_Q4_K: return quantize_q4_K(x, (block_q4_K *)out);
    case T_Q5_K: return quantize_q5_K(x, (block_q5_K *)out);
    default: return quantize_q6_K(x, (block_q6_K *)out);
    }
}

/* nblocks super-blocks of finite floats -> K-quant blocks; -1, or the first block whose
 * fp16 scale overflowed (the caller reports it). */
static int64_t kquantize_blocks(int type, const float *x, int64_t nblocks, uint8_t *out, int threads) {
    const size_t bb = kq_block_bytes(type);
    int64_t bad = -1;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < nblocks; i++) {
        if (kquantize_block(type, x + i * QK_K, out + i * bb)) {
#pragma omp critical
            if (bad < 0 || i < bad) bad = i;
        }
    }
    return bad;
}
