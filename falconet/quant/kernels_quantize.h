/* Quantizers, byte for byte the reference ones (ggml-quants.c quantize_row_*_ref, and
 * falconet/quant/formats.py, which tests/test_quant_formats.py checks against gguf.quants):
 * float32 arithmetic with no fused multiply-adds (-ffp-contract=off), C's roundf and
 * truncating casts, ties in the max/min scans going to the first value, scales stored as
 * fp16 rounded to nearest even (F16C). Included once by _kernels.c; x86 with F16C only
 * (kernels.py uses the numpy codecs elsewhere, and for the error messages: a block whose
 * fp16 scale or min overflows makes quantize_rows return its index). */
#if HAVE_X86

__attribute__((target("f16c"))) static inline uint16_t to_half(float f) {
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline int half_is_inf(uint16_t h) { return (h & 0x7fff) == 0x7c00; }

/* The value of largest magnitude with its sign (the first on ties; +0 for all zeros). */
static inline float signed_absmax(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < QK; i++) {
        if (amax < fabsf(x[i])) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    return max;
}

/* d ? 1/d : 0, and whether 1/d stayed finite (else the block's quants are 0). */
static inline float inverse(float d, int *ok) {
    float inv = d != 0.0f ? 1.0f / d : 0.0f;
    *ok = isfinite(inv);
    return inv;
}

/* One block; returns 0, or 1 if an fp16 field overflowed. */
__attribute__((target("avx,f16c"))) static int quantize_block(int type, const float *x, uint8_t *out) {
    int ok;
    uint8_t q[QK];
    switch (type) {
    case T_Q8_0: {
        block_q8_0 *b = (block_q8_0 *)out;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float d = amax / 127.0f, inv = inverse(d, &ok);
        b->d = to_half(d);
        for (int i = 0; i < QK; i++) b->qs[i] = ok ? (int8_t)roundf(x[i] * inv) : 0;
        return half_is_inf(b->d);
    }
    case T_Q4_0:
    case T_Q5_0: {
        const int q5 = type == T_Q5_0, top = q5 ? 31 : 15;
        const float d = signed_absmax(x) / (q5 ? -16.0f : -8.0f), inv = inverse(d, &ok);
        const float half = q5 ? 16.5f : 8.5f;
        for (int i = 0; i < QK; i++) {
            const int v = (int)(int8_t)(x[i] * inv + half);
            q[i] = ok ? (uint8_t)(v < top ? v : top) : 0;
        }
        uint16_t hd = to_half(d);
        if (q5) {
            block_q5_0 *b = (block_q5_0 *)out;
            uint32_t qh = 0;
            for (int i = 0; i < QK; i++) qh |= (uint32_t)((q[i] >> 4) & 1) << i;
            b->d = hd;
            memcpy(b->qh, &qh, 4);
            for (int i = 0; i < QK / 2; i++) b->qs[i] = (q[i] & 15) | (uint8_t)((q[i + 16] & 15) << 4);
        } else {
            block_q4_0 *b = (block_q4_0 *)out;
            b->d = hd;
            for (int i = 0; i < QK / 2; i++) b->qs[i] = q[i] | (uint8_t)(q[i + 16] << 4);
        }
        return half_is_inf(hd);
    }
    default: { /* T_Q4_1 */
        block_q4_1 *b = (block_q4_1 *)out;
        float min = x[0], max = x[0];
        for (int i = 1; i < QK; i++) {
            if (x[i] < min) min = x[i];
            if (x[i] > max) max = x[i];
        }
        const float d = (max - min) / 15.0f, inv = inverse(d, &ok);
        for (int i = 0; i < QK; i++) {
            const int v = (int)(int8_t)((x[i] - min) * inv + 0.5f);
            q[i] = ok ? (uint8_t)(v < 15 ? v : 15) : 0;
        }
        b->d = to_half(d);
        b->m = to_half(min);
        for (int i = 0; i < QK / 2; i++) b->qs[i] = q[i] | (uint8_t)(q[i + 16] << 4);
        return half_is_inf(b->d) || half_is_inf(b->m);
    }
    }
}

/* Finite float32 rows [N, K] -> GGML blocks; -1, or the first block whose fp16 field
 * overflowed (the caller reports it). */
static int64_t quantize_rows(int type, const float *x, int64_t N, int64_t K, uint8_t *out, int threads) {
    const int64_t nblocks = N * (K / QK);
    const size_t bb = block_bytes(type);
    int64_t bad = -1;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < nblocks; i++) {
        if (quantize_block(type, x + i * QK, out + i * bb)) {
#pragma omp critical
            if (bad < 0 || i < bad) bad = i;
        }
    }
    return bad;
}
#endif
