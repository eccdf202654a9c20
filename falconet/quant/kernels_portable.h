/* Portable C kernels: block unpacking and the reference row dot products. Included once by _kernels.c. */

/* ---- portable kernels ----------------------------------------------------------- */

/* Weight block b of a row as 32 integer quants and (scale, min). */
static void unpack_block(int type, const uint8_t *row, int64_t b, int8_t q[QK], float *d, float *m) {
    int i;
    *m = 0.0f;
    switch (type) {
    case T_Q4_0: {
        const block_q4_0 *w = (const block_q4_0 *)row + b;
        for (i = 0; i < QK / 2; i++) { q[i] = (w->qs[i] & 15) - 8; q[i + 16] = (w->qs[i] >> 4) - 8; }
        *d = half_table[w->d];
        break;
    }
    case T_Q4_1: {
        const block_q4_1 *w = (const block_q4_1 *)row + b;
        for (i = 0; i < QK / 2; i++) { q[i] = w->qs[i] & 15; q[i + 16] = w->qs[i] >> 4; }
        *d = half_table[w->d];
        *m = half_table[w->m];
        break;
    }
    case T_Q5_0: {
        const block_q5_0 *w = (const block_q5_0 *)row + b;
        uint32_t qh;
        memcpy(&qh, w->qh, 4);
        for (i = 0; i < QK / 2; i++) {
            q[i] = ((w->qs[i] & 15) | ((qh >> i) & 1) << 4) - 16;
            q[i + 16] = ((w->qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4) - 16;
        }
        *d = half_table[w->d];
        break;
    }
    default: { /* T_Q8_0 */
        const block_q8_0 *w = (const block_q8_0 *)row + b;
        memcpy(q, w->qs, QK);
        *d = half_table[w->d];
    }
    }
}

static size_t block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return sizeof(block_q4_0);
    case T_Q4_1: return sizeof(block_q4_1);
    case T_Q5_0: return sizeof(block_q5_0);
    case T_Q8_0: return sizeof(block_q8_0);
    default: return 0;
    }
}

static void gemv_rows_ref(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                          int64_t nb, const block_x8 *xq, int64_t M, int64_t N, float *y) {
    int8_t q[QK];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = W + n * row_bytes;
        float acc[MAX_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            unpack_block(type, row, b, q, &d, &m);
            for (int64_t r = 0; r < M; r++) {
                const block_x8 *xb = xq + r * nb + b;
                int sum = 0;
                for (int i = 0; i < QK; i++) sum += q[i] * xb->qs[i];
                acc[r] += d * xb->d * (float)sum + m * xb->s;
            }
        }
        for (int64_t r = 0; r < M; r++) y[r * N + n] = acc[r];
    }
}

static void dequant_rows_ref(int type, const uint8_t *W, size_t row_bytes, int64_t n0, int64_t n1,
                             int64_t nb, float *out) {
    int8_t q[QK];
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + n * nb * QK;
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            unpack_block(type, W + n * row_bytes, b, q, &d, &m);
            /* adding Q4_1's min only: q*d + 0 would turn GGML's -0.0 into +0.0 */
            for (int i = 0; i < QK; i++) o[b * QK + i] = type == T_Q4_1 ? (float)q[i] * d + m : (float)q[i] * d;
        }
    }
}
