"""Triton kernels for Q4_0 / Q8_0 weights on CUDA: y = x @ W.T and dequantize, reading
the GGML blocks where they lie; and the ternary (BitNet) product of int8 activations and
packed 2-bit codes (`ternary_matmul`, at the end).

Layout. W is the uint8 tensor a GGUF file holds, [N, K/32 * type_size], row n = output
feature n. A block of 32 values is a little-endian fp16 scale d, then the quants: Q4_0
has 16 bytes, byte j holding value j in its low nibble and value j + 16 in its high one,
value = (nibble - 8) * d; Q8_0 has 32 int8, value = q * d. Blocks are 18 or 34 bytes,
so only 2-byte aligned: the kernels load bytes, build d from its two bytes and bitcast
it to fp16. No second copy of the weights is ever made, so a model costs its GGUF size.

Two matmul tilings, picked by the number of activation rows M:

- decode (M <= GEMV_ROWS): one program per (activation row, GEMV_BLOCK_N output rows),
  looping over K a few blocks at a time. Per block it sums quant * x over the 32 values
  and then multiplies by d once, as llama.cpp does; all in fp32, which costs nothing
  here because the kernel is bound by reading the weights. The M programs that share a
  weight tile are launched next to each other, so the tile is read from DRAM once and
  from L2 for the other rows.
- prefill: (BLOCK_M x BLOCK_N) output tiles, K in steps of GEMM_BLOCK_K. Each step
  dequantizes the [BLOCK_K, BLOCK_N] weight tile in registers to exactly the values the
  numpy codec gives, casts it to the activations' dtype and calls tl.dot with an fp32
  accumulator: bf16/fp16 activations run bf16/fp16 tensor-core MMAs (as torch's matmul
  does in those dtypes); fp32 activations use TF32 only when
  torch.backends.cuda.matmul.allow_tf32 says so, else full fp32.

The output is fp32 [M, N]; the caller casts. The tile sizes are untuned first guesses;
benchmarks/bench_triton.py measures them against torch's bf16 matmul. Known costs to
weigh there: quants are loaded a byte at a time (the 2-byte block alignment rules out
wider loads without shuffles), and the prefill tile gathers each value's scale bytes
(L1 hits, but two extra loads per value).

Ternary. `ternary_matmul` multiplies int8 activations [M, K] by the codes of a BitNet
weight packed as transformers packs them (quant/ternary.py: uint8 [N/4, K], byte r of
column k holding output rows r, r + N/4, r + 2N/4, r + 3N/4 at bits 0-1 ... 6-7, code =
w + 1). Each program holds a (BLOCK_M x BLOCK_R) tile of packed rows, so the bytes it
loads give four int8 {-1, 0, 1} tiles, one per output row group, each an int8 tl.dot
with int32 accumulation (int8 tensor-core MMAs on a GPU): exact integers, so the result
equals the CPU kernel's and the PyTorch reference's, bit for bit, and never becomes a
float weight.

tests/test_triton_kernels.py runs these kernels in Triton's CPU interpreter; it has no
bf16 tl.dot, so the bf16 prefill path is checked only by the benchmark, on a GPU.
"""

from __future__ import annotations

import os

import torch

from falconet.quant.formats import QuantError

try:  # optional: CUDA installs of torch bring triton along, CPU ones do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Activation rows up to which the GEMV tiling is used (kernels.GEMV_ROWS on CPU).
GEMV_ROWS = 8
GEMV_BLOCK_N = 4  # output rows per decode program: many programs keep DRAM busy
GEMV_BLOCK_KB = 8  # 32-value blocks per K step of the decode loop
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 64
DEQUANT_BLOCK_N = 16
DEQUANT_BLOCK_KB = 8
TYPE_SIZE = {"q4_0": 18, "q8_0": 34}  # bytes per block of 32 values
QK = 32
TERNARY_BLOCK_M = 16  # tl.dot's smallest tile: decode rows are masked up to it
TERNARY_BLOCK_R = 32  # packed rows per program: 4 x 32 output features
TERNARY_BLOCK_K = 64
TERNARY_ZERO = 0x55  # a byte of four code-1 (weight 0) fields: what a masked load reads


def available() -> bool:
    """Triton is installed and can run: on a CUDA GPU, or in its CPU interpreter
    (TRITON_INTERPRET=1, which must be set before `import triton`: triton.language's own
    helpers are jitted for the compiler or the interpreter when triton is imported)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _check(qtype: str, blocks: torch.Tensor, N: int, K: int, device: torch.device) -> None:
    if qtype not in TYPE_SIZE:
        raise QuantError(f"triton kernels handle q4_0 and q8_0, not {qtype}")
    want = (N, K // QK * TYPE_SIZE[qtype])
    if K % QK or blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
        raise QuantError(
            f"{qtype} weight of {N} x {K} needs uint8 {want} blocks, "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
    if blocks.device != device:
        raise QuantError(f"{qtype} blocks are on {blocks.device}, the activations on {device}")
    if blocks.stride(1) != 1:
        raise QuantError(f"{qtype} blocks must have contiguous rows, got strides {blocks.stride()}")


def matmul(x: torch.Tensor, qtype: str, blocks: torch.Tensor, N: int) -> torch.Tensor:
    """x [M, K] float @ W.T for W in GGML blocks [N, row_bytes] -> float32 [M, N]."""
    M, K = x.shape
    _check(qtype, blocks, N, K, x.device)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y
    is_q4, type_size = qtype == "q4_0", TYPE_SIZE[qtype]
    if M <= GEMV_ROWS:
        grid = (M * triton.cdiv(N, GEMV_BLOCK_N),)
        _gemv_kernel[grid](
            x, blocks, y, M, N, K // QK, x.stride(0), blocks.stride(0), y.stride(0),
            IS_Q4=is_q4, TYPE_SIZE=type_size, BLOCK_N=GEMV_BLOCK_N, BLOCK_KB=GEMV_BLOCK_KB,
        )  # fmt: skip
        return y
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, GEMM_BLOCK_N))
    _gemm_kernel[grid](
        x, blocks, y, M, N, K, x.stride(0), blocks.stride(0), y.stride(0),
        IS_Q4=is_q4, TYPE_SIZE=type_size, BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N,
        BLOCK_K=GEMM_BLOCK_K, INPUT_PRECISION=precision,
    )  # fmt: skip
    return y


def dequantize(qtype: str, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 blocks [N, row_bytes] -> float32 [N, cols], bit for bit the numpy codec's."""
    N = blocks.shape[0]
    _check(qtype, blocks, N, cols, blocks.device)
    out = torch.empty(N, cols, dtype=torch.float32, device=blocks.device)
    if N == 0 or cols == 0:
        return out
    grid = (triton.cdiv(N, DEQUANT_BLOCK_N), triton.cdiv(cols // QK, DEQUANT_BLOCK_KB))
    _dequantize_kernel[grid](
        blocks, out, N, cols // QK, blocks.stride(0), out.stride(0),
        IS_Q4=qtype == "q4_0", TYPE_SIZE=TYPE_SIZE[qtype],
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_KB=DEQUANT_BLOCK_KB,
    )  # fmt: skip
    return out


def ternary_matmul(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x packed ternary codes uint8 [N/4, K] -> the integer products int32
    [M, N] (quant/ternary.py's layout)."""
    M, K = xq.shape
    R = packed.shape[0]
    if xq.dtype != torch.int8 or packed.dtype != torch.uint8 or packed.shape[1:] != (K,):
        raise QuantError(
            f"ternary product needs int8 [M, K] activations and uint8 [N/4, K] codes, got "
            f"{xq.dtype} {tuple(xq.shape)} and {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.device != xq.device:
        raise QuantError(f"ternary codes are on {packed.device}, the activations on {xq.device}")
    xq, packed = xq.contiguous(), packed.contiguous()
    y = torch.empty(M, 4 * R, dtype=torch.int32, device=xq.device)
    if M == 0 or R == 0:
        return y
    grid = (triton.cdiv(M, TERNARY_BLOCK_M), triton.cdiv(R, TERNARY_BLOCK_R))
    _ternary_kernel[grid](
        xq, packed, y, M, R, K, xq.stride(0), packed.stride(0), y.stride(0),
        ZERO=TERNARY_ZERO, BLOCK_M=TERNARY_BLOCK_M, BLOCK_R=TERNARY_BLOCK_R,
        BLOCK_K=TERNARY_BLOCK_K,
    )  # fmt: skip
    return y


if triton is not None:

    @triton.jit
    def _scale(block_ptr, mask):
        """The fp16 d at the start of each block, as fp32 (0 where masked)."""
        lo = tl.load(block_ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(block_ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, y_ptr, M, N, n_blocks, stride_xm, stride_wn, stride_ym,
        IS_Q4: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_KB: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        m = pid % M  # the M programs of one weight tile are neighbours: L2 reuse
        rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64) * stride_wn  # (BN,)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
        for kb0 in range(0, n_blocks, BLOCK_KB):
            kb = kb0 + tl.arange(0, BLOCK_KB)  # (BKB,)
            kb_ok = kb < n_blocks
            ok = row_ok[:, None] & kb_ok[None, :]  # (BN, BKB)
            blk = w_rows[:, None] + kb[None, :] * TYPE_SIZE  # (BN, BKB) block starts
            d = _scale(blk, ok)
            x_blk = x_row + kb[:, None] * 32  # (BKB, 1)
            if IS_Q4:
                j = tl.arange(0, 16)
                qs = tl.load(blk[:, :, None] + 2 + j[None, None, :], mask=ok[:, :, None], other=0)
                qs = qs.to(tl.int32)  # (BN, BKB, 16)
                lo = ((qs & 15) - 8).to(tl.float32)
                hi = ((qs >> 4) - 8).to(tl.float32)
                x_lo = tl.load(x_blk + j[None, :], mask=kb_ok[:, None], other=0.0).to(tl.float32)
                x_hi = tl.load(x_blk + 16 + j[None, :], mask=kb_ok[:, None], other=0.0)
                part = tl.sum(lo * x_lo[None, :, :] + hi * x_hi.to(tl.float32)[None, :, :], axis=2)
            else:
                j = tl.arange(0, 32)
                qs = tl.load(blk[:, :, None] + 2 + j[None, None, :], mask=ok[:, :, None], other=0)
                q = qs.to(tl.int8, bitcast=True).to(tl.float32)  # (BN, BKB, 32)
                xs = tl.load(x_blk + j[None, :], mask=kb_ok[:, None], other=0.0).to(tl.float32)
                part = tl.sum(q * xs[None, :, :], axis=2)
            acc += part * d  # (BN, BKB): one scale multiply per block
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + rows, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _dequant_tile(w_rows, k, ok, IS_Q4: tl.constexpr, TYPE_SIZE: tl.constexpr):
        """Values of W at rows `w_rows` (row pointers, (1, BN)) and columns k ((BK, 1)):
        (BK, BN) fp32, computed as the numpy codec does ((q - 8) * d, or q * d)."""
        blk = w_rows + (k // 32) * TYPE_SIZE  # (BK, BN) block starts
        i = k % 32
        d = _scale(blk, ok)
        if IS_Q4:
            qs = tl.load(blk + 2 + i % 16, mask=ok, other=0).to(tl.int32)
            q = ((qs >> ((i // 16) * 4)) & 15) - 8
        else:
            q = tl.load(blk + 2 + i, mask=ok, other=0).to(tl.int8, bitcast=True)
        return q.to(tl.float32) * d

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        IS_Q4: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # M tiles on the fast grid axis: the programs sharing a weight tile run together
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        m_ok, n_ok = rm < M, rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        w_rows = w_ptr + rn.to(tl.int64)[None, :] * stride_wn  # (1, BN)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = _dequant_tile(w_rows, k[:, None], k_ok[:, None] & n_ok[None, :], IS_Q4, TYPE_SIZE)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=INPUT_PRECISION)  # (BM, BN)
        out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequantize_kernel(
        w_ptr, out_ptr, N, n_blocks, stride_wn, stride_on,
        IS_Q4: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_KB: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        kb = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)  # (BKB,)
        ok = (rows < N)[:, None] & (kb < n_blocks)[None, :]  # (BN, BKB)
        blk = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + kb[None, :] * TYPE_SIZE
        d = _scale(blk, ok)[:, :, None]  # (BN, BKB, 1)
        out = out_ptr + rows.to(tl.int64)[:, None, None] * stride_on + kb[None, :, None] * 32
        if IS_Q4:
            j = tl.arange(0, 16)[None, None, :]
            qs = tl.load(blk[:, :, None] + 2 + j, mask=ok[:, :, None], other=0).to(tl.int32)
            tl.store(out + j, ((qs & 15) - 8).to(tl.float32) * d, mask=ok[:, :, None])
            tl.store(out + 16 + j, ((qs >> 4) - 8).to(tl.float32) * d, mask=ok[:, :, None])
        else:
            j = tl.arange(0, 32)[None, None, :]
            qs = tl.load(blk[:, :, None] + 2 + j, mask=ok[:, :, None], other=0)
            q = qs.to(tl.int8, bitcast=True).to(tl.float32)
            tl.store(out + j, q * d, mask=ok[:, :, None])

    @triton.jit
    def _ternary_kernel(
        x_ptr, p_ptr, y_ptr, M, R, K, stride_xm, stride_pr, stride_ym,
        ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,) packed rows
        m_ok, r_ok = rm < M, rr < R
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        p_rows = p_ptr + rr.to(tl.int64)[None, :] * stride_pr  # (1, BR)
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            # masked bytes read as four weights 0, so they add nothing
            p = tl.load(p_rows + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=ZERO)
            p = p.to(tl.int32)  # (BK, BR)
            acc0 = tl.dot(x, ((p & 3) - 1).to(tl.int8), acc0, out_dtype=tl.int32)
            acc1 = tl.dot(x, (((p >> 2) & 3) - 1).to(tl.int8), acc1, out_dtype=tl.int32)
            acc2 = tl.dot(x, (((p >> 4) & 3) - 1).to(tl.int8), acc2, out_dtype=tl.int32)
            acc3 = tl.dot(x, ((p >> 6) - 1).to(tl.int8), acc3, out_dtype=tl.int32)
        out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rr[None, :]  # row group 0
        ok = m_ok[:, None] & r_ok[None, :]
        tl.store(out, acc0, mask=ok)
        tl.store(out + R, acc1, mask=ok)
        tl.store(out + 2 * R, acc2, mask=ok)
        tl.store(out + 3 * R, acc3, mask=ok)
