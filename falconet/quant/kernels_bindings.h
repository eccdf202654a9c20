/* The Python bindings: argument checks, then the kernels with the GIL released. Included once by _kernels.c. */

/* ---- Python bindings ------------------------------------------------------------ */

static int check_args(int type, Py_ssize_t K, Py_ssize_t M, int threads) {
    if (!block_bytes(type)) {
        PyErr_Format(PyExc_ValueError, "unsupported GGML type %d", type);
        return 0;
    }
    if (K <= 0 || K % QK) {
        PyErr_Format(PyExc_ValueError, "row length %zd is not a positive multiple of %d", K, QK);
        return 0;
    }
    if (M < 0 || M > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "gemv takes 0..%d activation rows, got %zd", MAX_ROWS, M);
        return 0;
    }
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", threads);
        return 0;
    }
    return 1;
}

/* gemv(...) on GGML rows (at most MAX_ROWS activation rows) or gemv_x8(...) on x8 tiles
 * (any number of rows): the same arguments, checked before the pointers are used. */
static PyObject *run_gemv(PyObject *args, int x8) {
    int type, threads;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!check_args(type, K, x8 ? 0 : M, threads)) return NULL;
    if (M < 0) {
        PyErr_SetString(PyExc_ValueError, "negative row count");
        return NULL;
    }
    if (x8 && (type == T_Q5_0 || N % X8 || !use_avx2)) {
        PyErr_SetString(PyExc_ValueError, "x8 kernels take Q4_0/Q4_1/Q8_0, rows a multiple of 8, and AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    (x8 ? gemv_x8 : gemv)(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M,
                          (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_gemv(PyObject *self, PyObject *args) { return run_gemv(args, 0); }

static PyObject *py_gemv_x8(PyObject *self, PyObject *args) { return run_gemv(args, 1); }

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long x, out;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKnnKi", &type, &x, &N, &K, &out, &threads)) return NULL;
    if (!check_args(type, K, 0, threads)) return NULL;
#if HAVE_X86
    if (!__builtin_cpu_supports("f16c")) {
        PyErr_SetString(PyExc_ValueError, "the compiled quantizers need F16C");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = quantize_rows(type, (const float *)(uintptr_t)x, N, K, (uint8_t *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
#else
    PyErr_SetString(PyExc_ValueError, "the compiled quantizers exist only on x86");
    return NULL;
#endif
}

static PyObject *py_kquantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long x, out;
    Py_ssize_t nblocks;
    if (!PyArg_ParseTuple(args, "iKnKi", &type, &x, &nblocks, &out, &threads)) return NULL;
    if (!kq_block_bytes(type) || nblocks < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "kquantize needs a K-quant type (10-14), nblocks >= 0, threads >= 1; got %d, %zd, %d",
                     type, nblocks, threads);
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = kquantize_blocks(type, (const float *)(uintptr_t)x, nblocks, (uint8_t *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type, threads;
    unsigned long long w, out;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKnnKi", &type, &w, &N, &K, &out, &threads)) return NULL;
    if (!check_args(type, K, 0, threads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dequantize(type, (const uint8_t *)(uintptr_t)w, N, K, (float *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_linear_rows(PyObject *self, PyObject *args) {
    int wt, threads, rc;
    unsigned long long x, w, out;
    Py_ssize_t M, K, N;
    if (!PyArg_ParseTuple(args, "KKKnnnii", &x, &w, &out, &M, &K, &N, &wt, &threads)) return NULL;
    const int round_out = !(wt & LINEAR_UNROUNDED);
    wt &= ~LINEAR_UNROUNDED;
    if (wt != W_F32 && wt != W_BF16 && wt != W_F16) {
        PyErr_Format(PyExc_ValueError, "weight dtype code %d is not 0 (fp32), 1 (bf16) or 2 (fp16)", wt);
        return NULL;
    }
    if (M < 0 || K <= 0 || N < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "linear_rows needs M >= 0, K > 0, N >= 0, threads >= 1; got %zd, %zd, %zd, %d",
                     M, K, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = linear_rows(wt, round_out, (const float *)(uintptr_t)x, (const uint8_t *)(uintptr_t)w, (float *)(uintptr_t)out, M, K,
                     N, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_lora_rows(PyObject *self, PyObject *args) {
    unsigned long long x, A, Bt, start, rank, scale, rows, y;
    Py_ssize_t R, K, N;
    int x_bf16, y_bf16, threads, rc;
    if (!PyArg_ParseTuple(args, "KinnKKnKKKKKii", &x, &x_bf16, &R, &K, &A, &Bt, &N, &start, &rank, &scale, &rows,
                          &y, &y_bf16, &threads))
        return NULL;
    if (R < 0 || K <= 0 || N <= 0 || threads < 1 || (x_bf16 != 0 && x_bf16 != 1) || (y_bf16 != 0 && y_bf16 != 1)) {
        PyErr_Format(PyExc_ValueError, "lora_rows needs R >= 0, K > 0, N > 0, x_bf16 and y_bf16 0 or 1, "
                     "threads >= 1; got %zd, %zd, %zd, %d, %d, %d", R, K, N, x_bf16, y_bf16, threads);
        return NULL;
    }
    /* A decode step's call takes tens of microseconds: releasing the GIL for it would let
     * the server's event loop take it for up to a switch interval (5 ms) per layer. */
    PyThreadState *ts = R * (K + N) >= LORA_RELEASE_GIL ? PyEval_SaveThread() : NULL;
    rc = lora_rows((const void *)(uintptr_t)x, x_bf16, R, K, (const float *)(uintptr_t)A, (const float *)(uintptr_t)Bt, N,
                   (const int32_t *)(uintptr_t)start, (const int32_t *)(uintptr_t)rank,
                   (const float *)(uintptr_t)scale, (const int64_t *)(uintptr_t)rows, (void *)(uintptr_t)y, y_bf16,
                   threads);
    if (ts) PyEval_RestoreThread(ts);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_selective_scan(PyObject *self, PyObject *args) {
    unsigned long long h, u, dt, A, B, C, y;
    Py_ssize_t batch, T, E, N;
    int threads, rc;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnnni", &h, &u, &dt, &A, &B, &C, &y, &batch, &T, &E, &N, &threads))
        return NULL;
    if (batch < 0 || T < 0 || E < 1 || N < 1 || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "selective_scan needs batch >= 0, T >= 0, E >= 1, N >= 1, threads >= 1; got %zd, %zd, %zd, %zd, %d",
                     batch, T, E, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = selective_scan((float *)(uintptr_t)h, (const float *)(uintptr_t)u, (const float *)(uintptr_t)dt,
                        (const float *)(uintptr_t)A, (const float *)(uintptr_t)B, (const float *)(uintptr_t)C,
                        (float *)(uintptr_t)y, batch, T, E, N, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, kp, vp, slots, starts, bias, out;
    Py_ssize_t B, H, K, D, bias_stride;
    int wt, threads, rc;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKiKKnnnnKnfKi", &q, &kp, &vp, &wt, &slots, &starts, &B, &H, &K, &D, &bias,
                          &bias_stride, &scale, &out, &threads))
        return NULL;
    if (wt < W_F32 || wt > W_F16 || B < 0 || H < 1 || K < 1 || H % K || D < 1 || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "decode_attention needs a fp32/bf16/fp16 pool, B >= 0, H a multiple of K >= 1, D >= 1, "
                     "threads >= 1; got dtype %d, B %zd, H %zd, K %zd, D %zd, threads %d",
                     wt, B, H, K, D, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = decode_attention((const float *)(uintptr_t)q, (const uint8_t *)(uintptr_t)kp, (const uint8_t *)(uintptr_t)vp,
                          wt, (const int64_t *)(uintptr_t)slots, (const int64_t *)(uintptr_t)starts, B, H, K, D,
                          (const float *)(uintptr_t)bias, bias_stride, scale, (float *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_gelu(PyObject *self, PyObject *args) {
    unsigned long long x, y;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKn", &x, &y, &n)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "gelu needs n >= 0, got %zd", n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gelu_erf((const float *)(uintptr_t)x, (float *)(uintptr_t)y, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rms_norm(x_ptr, w_ptr, y_ptr, rows, n, eps), fp32 (kernels_norm.h) */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    Py_ssize_t rows, n;
    double eps;
    if (!PyArg_ParseTuple(args, "KKKnnd", &x, &w, &y, &rows, &n, &eps)) return NULL;
    if (rows < 0 || n < 1) {
        PyErr_Format(PyExc_ValueError, "rms_norm needs rows >= 0 and n >= 1, got %zd, %zd", rows, n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm_rows((const float *)(uintptr_t)x, (const float *)(uintptr_t)w, (float *)(uintptr_t)y, rows, n,
                  (float)eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rotary(x_ptr, sb, sh, st, cos_ptr, sin_ptr, cb, ct, y_ptr, yb, yh, yt, B, H, T, D)
 * (kernels_norm.h) */
static PyObject *py_rotary(PyObject *self, PyObject *args) {
    unsigned long long x, c, s, y;
    Py_ssize_t sb, sh, st, cb, ct, yb, yh, yt, B, H, T, D;
    if (!PyArg_ParseTuple(args, "KnnnKKnnKnnnnnnn", &x, &sb, &sh, &st, &c, &s, &cb, &ct, &y, &yb, &yh, &yt, &B, &H,
                          &T, &D))
        return NULL;
    if (B < 0 || H < 0 || T < 0 || D < 2 || D % 2) {
        PyErr_Format(PyExc_ValueError, "rotary needs B, H, T >= 0 and an even D >= 2; got %zd, %zd, %zd, %zd", B,
                     H, T, D);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rotary_rows((const float *)(uintptr_t)x, sb, sh, st, (const float *)(uintptr_t)c, (const float *)(uintptr_t)s,
                cb, ct, (float *)(uintptr_t)y, yb, yh, yt, B, H, T, D);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* silu_gate(g_ptr, u_ptr, y_ptr, n), fp32 (kernels_norm.h) */
static PyObject *py_silu_gate(PyObject *self, PyObject *args) {
    unsigned long long g, u, y;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKKn", &g, &u, &y, &n)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "silu_gate needs n >= 0, got %zd", n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    silu_gate((const float *)(uintptr_t)g, (const float *)(uintptr_t)u, (float *)(uintptr_t)y, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ssd_scan(PyObject *self, PyObject *args) {
    unsigned long long S, x, dt, A, D, B, C, y;
    Py_ssize_t batch, T, H, P, G, N;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnni", &S, &x, &dt, &A, &D, &B, &C, &y, &batch, &T, &H, &P, &G, &N,
                          &threads))
        return NULL;
    if (batch < 0 || T < 0 || H < 1 || P < 1 || G < 1 || N < 1 || H % G || threads < 1) {
        PyErr_Format(PyExc_ValueError,
                     "ssd_scan needs batch, T >= 0, H, P, G, N >= 1 with G dividing H, threads >= 1; "
                     "got %zd, %zd, %zd, %zd, %zd, %zd, %d",
                     batch, T, H, P, G, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ssd_scan((float *)(uintptr_t)S, (const float *)(uintptr_t)x, (const float *)(uintptr_t)dt,
             (const float *)(uintptr_t)A, (const float *)(uintptr_t)D, (const float *)(uintptr_t)B,
             (const float *)(uintptr_t)C, (float *)(uintptr_t)y, batch, T, H, P, G, N, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_ternary_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, p, out;
    Py_ssize_t M, K, R;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKnnni", &x, &p, &out, &M, &K, &R, &threads)) return NULL;
    if (M < 0 || K < 0 || R < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "ternary_matmul needs M, K, R >= 0 and threads >= 1; got %zd, %zd, %zd, %d",
                     M, K, R, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ternary_matmul((const int8_t *)(uintptr_t)x, (const uint8_t *)(uintptr_t)p, (int32_t *)(uintptr_t)out, M, K, R,
                   threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_tq2_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    Py_ssize_t M, K, N;
    int threads, rc, x8 = 0;
    if (!PyArg_ParseTuple(args, "KKKnnni|p", &x, &w, &y, &M, &K, &N, &threads, &x8)) return NULL;
    if (M < 0 || K < 0 || N < 0 || K % QK_K || threads < 1 || (x8 && N % 8)) {
        PyErr_Format(PyExc_ValueError,
                     "tq2_matmul needs M, N >= 0 (N a multiple of 8 in tiles), K a multiple of %d and "
                     "threads >= 1; got %zd, %zd, %zd, %d",
                     QK_K, M, K, N, threads);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = tq2_matmul((const float *)(uintptr_t)x, (const uint8_t *)(uintptr_t)w, (float *)(uintptr_t)y, M, K, N,
                    threads, x8);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* tq2_repack(src_ptr, dst_ptr, N, K, to_x8): TQ2_0 rows <-> tiles of 8 rows */
static PyObject *py_tq2_repack(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    Py_ssize_t N, K;
    int to_x8;
    if (!PyArg_ParseTuple(args, "KKnnp", &src, &dst, &N, &K, &to_x8)) return NULL;
    if (K <= 0 || K % QK_K || N < 0 || N % 8) {
        PyErr_Format(PyExc_ValueError, "tq2_repack needs K a positive multiple of %d and N a multiple of 8; "
                     "got K=%zd, N=%zd", QK_K, K, N);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    tq2_repack((const uint8_t *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, N, K / QK_K, to_x8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* kq_gemm(type, w_ptr, N, K, x_ptr, M, y_ptr, threads), any M, on GGUF rows; or
 * kq_gemm_x8(...) the same on Q4_K x8 tiles (kernels_kq_x8.h) */
static PyObject *run_kq_gemm(PyObject *args, int x8) {
    int type, threads, rc = 0;
    unsigned long long w, x, y;
    Py_ssize_t N, K, M;
    if (!PyArg_ParseTuple(args, "iKnnKnKi", &type, &w, &N, &K, &x, &M, &y, &threads)) return NULL;
    if (!kq_block_bytes(type)) {
        PyErr_Format(PyExc_ValueError, "kq_gemm takes the K-quant types 10..14, got GGML type %d", type);
        return NULL;
    }
    if (K <= 0 || K % QK_K || N < 0 || M < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "kq_gemm needs K a positive multiple of %d, N, M >= 0, threads >= 1; "
                     "got K=%zd, N=%zd, M=%zd, threads=%d", QK_K, K, N, M, threads);
        return NULL;
    }
    if (x8 && (!kq_x8_type(type) || N % X8 || !use_avx2)) {
        PyErr_SetString(PyExc_ValueError, "kq x8 tiles are Q4_K, Q5_K or Q6_K, rows a multiple of 8, on AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#if HAVE_X86
    if (x8)
        rc = kq_gemm_x8(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M, (float *)(uintptr_t)y,
                        threads);
    else
#endif
        rc = kq_gemm(type, (const uint8_t *)(uintptr_t)w, N, K, (const float *)(uintptr_t)x, M,
                     (float *)(uintptr_t)y, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_kq_gemm(PyObject *self, PyObject *args) { return run_kq_gemm(args, 0); }

static PyObject *py_kq_gemm_x8(PyObject *self, PyObject *args) { return run_kq_gemm(args, 1); }

/* kq_repack(type, src_ptr, dst_ptr, N, K, to_x8): Q4_K / Q5_K / Q6_K rows <-> kq x8 tiles */
static PyObject *py_kq_repack(PyObject *self, PyObject *args) {
    int type, to_x8;
    unsigned long long src, dst;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKKnnp", &type, &src, &dst, &N, &K, &to_x8)) return NULL;
    if (!kq_x8_type(type)) {
        PyErr_Format(PyExc_ValueError, "kq x8 tiles are Q4_K (12), Q5_K (13) or Q6_K (14), got GGML type %d", type);
        return NULL;
    }
    if (K <= 0 || K % QK_K || N < 0 || N % X8) {
        PyErr_Format(PyExc_ValueError, "kq_repack needs K a positive multiple of %d and N a multiple of %d; "
                     "got K=%zd, N=%zd", QK_K, X8, K, N);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_repack(type, (const uint8_t *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, N, K / QK_K, to_x8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_quantize_q8_K(PyObject *self, PyObject *args) {
    unsigned long long x, out;
    Py_ssize_t M, K;
    if (!PyArg_ParseTuple(args, "KnnK", &x, &M, &K, &out)) return NULL;
    if (K <= 0 || K % QK_K || M < 0) {
        PyErr_Format(PyExc_ValueError, "quantize_q8_K needs K a positive multiple of %d and M >= 0", QK_K);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_quantize_activations((const float *)(uintptr_t)x, M, K, (block_q8_K *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(use_avx2 ? "avx2" : "portable");
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "portable") == 0) {
        use_avx2 = 0;
    } else if (strcmp(name, "avx2") == 0) {
#if HAVE_X86
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
            PyErr_SetString(PyExc_ValueError, "this CPU has no AVX2/FMA/F16C");
            return NULL;
        }
        use_avx2 = 1;
#else
        PyErr_SetString(PyExc_ValueError, "AVX2 kernels exist only on x86");
        return NULL;
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "unknown SIMD path %s (avx2 or portable)", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

#if HAVE_X86
static int vnni_supported(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
}
#endif

static PyObject *py_int8_dot(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(use_vnni ? "vnni" : "maddubs");
}

static PyObject *py_set_int8_dot(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "maddubs") == 0) {
        use_vnni = 0;
        Py_RETURN_NONE;
    }
    if (strcmp(name, "vnni") != 0) {
        PyErr_Format(PyExc_ValueError, "unknown int8 dot product %s (vnni or maddubs)", name);
        return NULL;
    }
#if HAVE_X86
    if (vnni_supported()) {
        use_vnni = 1;
        Py_RETURN_NONE;
    }
#endif
    PyErr_SetString(PyExc_ValueError, "this CPU has no AVX-512 VNNI");
    return NULL;
}

static PyObject *py_repack(PyObject *self, PyObject *args) {
    int type, to_x8;
    unsigned long long src, dst;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKKnnp", &type, &src, &dst, &N, &K, &to_x8)) return NULL;
    if (!check_args(type, K, 0, 1)) return NULL;
    if (N % X8) {
        PyErr_Format(PyExc_ValueError, "x8 repacking needs a multiple of 8 rows, got %zd", N);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    repack(type, (const uint8_t *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, N, K / QK, to_x8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
