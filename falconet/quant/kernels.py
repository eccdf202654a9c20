"""Matmul and dequantize kernels for weights in GGML blocks, and the choice between them.

Paths, fastest first:

- CPU, compiled kernels (`_kernels.c`, built by the package's build; AVX2 with a
  portable C fallback). Activations are rounded to 8-bit blocks (as llama.cpp does) and
  multiplied with integer dot products; every activation row is computed alone, so a
  batch equals each row sent by itself, bit for bit.
  * Q4_0 / Q4_1 / Q8_0 with AVX2: the first forward repacks the weight into interleaved tiles
    of 8 rows (`x8`, see _kernels.c) and every call -- a decode step or a whole prompt
    -- runs the x8 kernel (a prompt passes in chunks of 8 rows over cache-resident
    tiles, so the weights are read once).
  * Q5_0 (and the portable path): the row-major kernel up to `GEMV_ROWS` rows;
    for more rows the weight is dequantized to fp32 one tile of output rows at a time
    and multiplied by BLAS, so no full fp32 copy ever exists.
  * TQ2_0 (llama.cpp's ternary type): its 2-bit codes straight from the file's blocks in
    integer sums with Q8_K activations, any number of rows (kernels_tq2.h); TQ1_0 is
    transcoded to TQ2_0 blocks at the first forward (`cpu_layout`), losslessly.
- CPU, K-quants (Q2_K..Q6_K, kernels_kquants.h): the GGUF blocks as they are, against
  activations rounded to llama.cpp's Q8_K (256 values per scale), for any number of
  rows; a prompt passes in chunks of 8 rows over cache-resident weight rows.
- CUDA with Triton, Q4_0 / Q8_0: triton_kernels.py.
- anything else: the numpy codecs dequantize a tile at a time (slow; exact).
"""

from __future__ import annotations

import numpy as np
import torch

from falconet.quant import QuantFormat, get_format
from falconet.quant.tquants import TernaryFormat, transcode

try:  # the compiled kernels are optional: no C compiler at install -> pure fallback
    from falconet.quant import _kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

# Activation rows up to which the integer GEMV path beats dequantize + GEMM.
GEMV_ROWS = 8
# Bytes of the fp32 weight tile of the prefill path; it stays in cache while BLAS reuses it.
TILE_BYTES = 4 << 20
NATIVE_TYPES = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6}
# Formats with the interleaved-rows layout (_kernels.c, "x8"): the decode GEMV serves 8
# output rows per instruction, about 2x the row-major kernel's speed per core.
X8_TYPES = {"q4_0", "q4_1", "q8_0"}
# K-quants with an x8 layout (kernels_kq_x8.h): Q4_K (the bulk of a Q4_K_M file), Q5_K and
# Q6_K; the same bits as their row-major kernel, faster.
KQ_X8_TYPES = {"q4_k", "q5_k", "q6_k"}
# K-quants computed in their GGUF blocks against Q8_K activations (any number of rows).
KQUANT_TYPES = {"q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14}
# the GGML type id x8_linear is given for each format with an x8 layout
X8_CODES = {**{t: NATIVE_TYPES[t] for t in X8_TYPES}, **{t: KQUANT_TYPES[t] for t in KQ_X8_TYPES}}
KQ_X8_CODES = {KQUANT_TYPES[t] for t in KQ_X8_TYPES}
Q8_K_BYTES = 292  # one activation block: float d, int8 qs[256], int16 bsums[16]


# The CPU layouts of a ternary type's weight: TQ2_0 rows (TQ1_0's base-3 bytes are
# transcoded to them; a TQ2_0 file's rows are read in place), or those rows in tiles of 8.
TERNARY_LAYOUT = "tq2_0"
TQ2_TILES = "tq2_x8"  # TQ2_0 blocks in tiles of 8 rows (kernels_tq2.h)


def native_available(fmt: QuantFormat) -> bool:
    return native is not None and fmt.name in NATIVE_TYPES


def kquant_available(fmt: QuantFormat) -> bool:
    return native is not None and fmt.name in KQUANT_TYPES


def kquant_linear(
    x: torch.Tensor, fmt: QuantFormat, blocks: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x [..., K] @ W.T for W in K-quant blocks [N, row_bytes] on the CPU -> [..., N] in
    x.dtype; each row of x is computed alone, so any batch equals its rows sent singly."""
    K = x.shape[-1]
    _check_blocks(fmt, blocks, out_features, K)
    rows = x.reshape(-1, K)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    y = torch.empty(rows.shape[0], out_features)
    native.kq_gemm(
        KQUANT_TYPES[fmt.name], blocks.data_ptr(), out_features, K, rows.data_ptr(),
        rows.shape[0], y.data_ptr(), _threads(),
    )  # fmt: skip
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def quantize_q8_K(x: torch.Tensor) -> np.ndarray:
    """fp32 rows [M, K] (K % 256 == 0) -> their Q8_K blocks as the kernels round them,
    a structured array [M, K/256] with fields d, qs, bsums (for tests and tools)."""
    rows = x.to(torch.float32).contiguous()
    M, K = rows.shape
    out = torch.empty(M * (K // 256) * Q8_K_BYTES, dtype=torch.uint8)
    native.quantize_q8_K(rows.data_ptr(), M, K, out.data_ptr())
    layout = np.dtype([("d", "<f4"), ("qs", "i1", (256,)), ("bsums", "<i2", (16,))])
    return out.numpy().view(layout).reshape(M, K // 256)


def dequantize(
    fmt: QuantFormat, data: torch.Tensor, cols: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 blocks [rows, row_bytes] -> float32 [rows, cols] on the same device (into
    `out`, a contiguous fp32 CPU tensor of that shape, when given)."""
    rows = data.shape[0]
    if data.device.type == "cpu" and native_available(fmt):
        _check_blocks(fmt, data, rows, cols)
        if out is None:
            out = torch.empty(rows, cols, dtype=torch.float32)
        elif (
            out.dtype != torch.float32
            or tuple(out.shape) != (rows, cols)
            or not out.is_contiguous()
        ):
            raise ValueError(f"dequantize: out must be contiguous float32 {(rows, cols)}")
        src = data.contiguous()
        native.dequantize(
            NATIVE_TYPES[fmt.name], src.data_ptr(), rows, cols, out.data_ptr(), _threads()
        )
        return out
    if data.device.type == "cuda" and fmt.name in ("q4_0", "q8_0"):
        from falconet.quant import triton_kernels

        if triton_kernels.available():
            return triton_kernels.dequantize(fmt.name, data, cols)
    raw = data.detach().to("cpu").contiguous().numpy()
    out = fmt.dequantize(raw, (rows, cols))
    return torch.from_numpy(np.ascontiguousarray(out)).to(data.device)


def quantize_into(fmt: QuantFormat, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Quantize finite fp32 rows `x` [n, K] into uint8 `out` [n, row_bytes] with the
    compiled quantizers (byte-exact with the numpy codecs; ~5-10x faster). Returns False
    -- leaving the work, and any error message, to the numpy codecs -- where they are
    not built, for other formats, and for input they would refuse (non-finite values, an
    fp16 scale that overflows)."""
    if native is None or fmt.name not in NATIVE_TYPES or native.simd() != "avx2":
        return False
    if not (x.is_contiguous() and out.is_contiguous() and bool(torch.isfinite(x).all())):
        return False
    bad = native.quantize(
        NATIVE_TYPES[fmt.name], x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), 1
    )
    return bad < 0


def x8_eligible(fmt: QuantFormat, out_features: int) -> bool:
    """Whether the CPU kernels have the interleaved-rows (x8) layout for this weight."""
    return (
        native is not None
        and (fmt.name in X8_TYPES or fmt.name in KQ_X8_TYPES)
        and out_features % 8 == 0
        and native.simd() == "avx2"
    )


def tq2_available() -> bool:
    return native is not None and hasattr(native, "tq2_repack")  # rows and tiles


def cpu_layout(fmt: QuantFormat, out_features: int) -> str:
    """The layout a CPU weight of this format is best held in: "x8" tiles; for the
    ternary types TQ2_0 blocks in tiles of 8 rows ("tq2_x8") or, with a row count that
    is not a multiple of 8, as rows (TQ1_0's transcoded, "tq2_0"); else "ggml" (the
    file's rows)."""
    if x8_eligible(fmt, out_features):
        return "x8"
    if isinstance(fmt, TernaryFormat) and tq2_available():
        if out_features % 8 == 0 and native.simd() == "avx2":
            return TQ2_TILES
        return _tq2_rows(fmt)
    return "ggml"


def tq2_layout(fmt: QuantFormat, out_features: int) -> str | None:
    """The layout in which a CPU weight of `fmt` is TQ2_0 blocks for the compiled kernel
    (its cpu_layout); None for the other formats or without the kernel."""
    if not (isinstance(fmt, TernaryFormat) and tq2_available()):
        return None
    return cpu_layout(fmt, out_features)


def _tq2_rows(fmt: QuantFormat) -> str:
    """The layout in which a ternary weight is TQ2_0 rows: TQ2_0's own, TQ1_0's transcoded."""
    return "ggml" if fmt.name == TERNARY_LAYOUT else TERNARY_LAYOUT


def layout_format(fmt: QuantFormat, layout: str) -> QuantFormat:
    """The format whose blocks a weight of `fmt` holds in `layout` (x8 tiles are `fmt`'s
    blocks permuted; the ternary layouts hold TQ2_0 blocks)."""
    return get_format(TERNARY_LAYOUT) if layout in (TERNARY_LAYOUT, TQ2_TILES) else fmt


def relayout(fmt: QuantFormat, blocks: torch.Tensor, cols: int, src: str, dst: str) -> torch.Tensor:
    """A `fmt` weight's bytes from layout `src` to layout `dst` (ggml, x8, tq2_0,
    tq2_x8); a CPU tensor, a new one unless the layouts are equal."""
    if src == dst:
        return blocks
    if "x8" in (src, dst):  # x8 only ever comes from or goes back to GGML rows
        return repack(fmt, blocks, cols, to_x8=dst == "x8")
    if TQ2_TILES in (src, dst):  # tiles only ever come from or go back to TQ2_0 rows
        rows = _tq2_rows(fmt)
        if src == TQ2_TILES:
            return relayout(fmt, untile(fmt, blocks, cols, src), cols, rows, dst)
        return _tq2_repack(relayout(fmt, blocks, cols, src, rows), cols, to_x8=True)
    a, b = layout_format(fmt, src), layout_format(fmt, dst)
    if not (isinstance(a, TernaryFormat) and isinstance(b, TernaryFormat)):
        raise ValueError(f"no layout {dst} for {fmt.name} weights")
    _check_blocks(a, blocks.contiguous(), blocks.shape[0], cols)
    return torch.from_numpy(transcode(blocks.contiguous().numpy(), a, b))


def untile(fmt: QuantFormat, tiles: torch.Tensor, cols: int, layout: str) -> torch.Tensor:
    """Groups of 8 rows held as tiles ("x8" or "tq2_x8") back as rows of
    layout_format(fmt, layout)'s blocks."""
    if layout == "x8":
        return repack(fmt, tiles, cols, to_x8=False)
    return _tq2_repack(tiles, cols, to_x8=False)


def _tq2_repack(blocks: torch.Tensor, cols: int, to_x8: bool) -> torch.Tensor:
    """TQ2_0 rows <-> tiles of 8 rows (kernels_tq2.h; a permutation within each group)."""
    src = blocks.contiguous()
    _check_blocks(get_format(TERNARY_LAYOUT), src, src.shape[0], cols)
    out = torch.empty_like(src)
    native.tq2_repack(src.data_ptr(), out.data_ptr(), src.shape[0], cols, to_x8)
    return out


def repack(fmt: QuantFormat, blocks: torch.Tensor, cols: int, to_x8: bool) -> torch.Tensor:
    """GGML rows <-> x8 tiles (a permutation of the bytes within each group of 8 rows)."""
    src = blocks.contiguous()
    _check_blocks(fmt, src, src.shape[0], cols)
    out = torch.empty_like(src)
    if fmt.name in KQ_X8_TYPES:
        code = KQUANT_TYPES[fmt.name]
        native.kq_repack(code, src.data_ptr(), out.data_ptr(), src.shape[0], cols, to_x8)
    else:
        native.repack(
            NATIVE_TYPES[fmt.name], src.data_ptr(), out.data_ptr(), src.shape[0], cols, to_x8
        )
    return out


def x8_linear(x: torch.Tensor, code: int, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """quant_linear for a CPU weight already in x8 tiles (checked when it was repacked):
    the per-call work is one conversion, one allocation and the kernel."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    y = torch.empty(rows.shape[0], out_features)
    (native.kq_gemm_x8 if code in KQ_X8_CODES else native.gemv_x8)(
        code, tiles.data_ptr(), out_features, K, rows.data_ptr(), rows.shape[0], y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def tq2_linear(
    x: torch.Tensor, blocks: torch.Tensor, out_features: int, tiles: bool = False
) -> torch.Tensor:
    """x [..., K] @ W.T for W in TQ2_0 blocks [N, K/256*66] (checked by the caller), as
    rows or (tiles=True) in tiles of 8 rows, by the compiled kernel: Q8_K activations,
    integer sums per block, no float weight; both layouts give the same bits."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    y = torch.empty(rows.shape[0], out_features)
    native.tq2_matmul(
        rows.data_ptr(), blocks.data_ptr(), y.data_ptr(), rows.shape[0], K, out_features,
        torch.get_num_threads(), tiles,
    )  # fmt: skip
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def quant_linear(
    x: torch.Tensor,
    fmt: QuantFormat,
    blocks: torch.Tensor,
    out_features: int,
    layout: str = "ggml",
) -> torch.Tensor:
    """x [..., K] @ W.T for W in GGML blocks [N, row_bytes] (or x8 tiles of them, CPU
    only) -> [..., N] in x.dtype."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if x.device.type == "cuda" and fmt.name in ("q4_0", "q8_0"):
        from falconet.quant import triton_kernels

        if triton_kernels.available():
            y = triton_kernels.matmul(rows, fmt.name, blocks, out_features)
            return y.to(x.dtype).view(*x.shape[:-1], out_features)
    if layout == "x8":  # decode and prompts alike: integer products, weights read once
        _check_blocks(fmt, blocks, out_features, K)
        return x8_linear(x, X8_CODES[fmt.name], blocks, out_features)
    if x.device.type == "cpu" and kquant_available(fmt):
        return kquant_linear(x, fmt, blocks, out_features)
    fmt = layout_format(fmt, layout)
    if fmt.name == TERNARY_LAYOUT and x.device.type == "cpu" and tq2_available():
        _check_blocks(fmt, blocks, out_features, K)
        return tq2_linear(x, blocks, out_features, tiles=layout == TQ2_TILES)
    xf = rows.to(torch.float32).contiguous()
    if x.device.type == "cpu" and native_available(fmt) and M <= GEMV_ROWS:
        _check_blocks(fmt, blocks, out_features, K)
        y = torch.empty(M, out_features, dtype=torch.float32)
        native.gemv(
            NATIVE_TYPES[fmt.name],
            blocks.data_ptr(),
            out_features,
            K,
            xf.data_ptr(),
            M,
            y.data_ptr(),
            _threads(),
        )
    else:
        y = _tiled_dequant_matmul(xf, fmt, blocks, out_features)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def _tiled_dequant_matmul(
    x: torch.Tensor, fmt: QuantFormat, blocks: torch.Tensor, out_features: int
) -> torch.Tensor:
    K = x.shape[-1]
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    tile = max(16, TILE_BYTES // (K * 4))
    # one tile buffer, reused: a fresh multi-MB allocation per tile would be mapped and
    # page-faulted anew each time, which costs more than the dequantization itself
    buf = torch.empty(min(tile, out_features), K, dtype=torch.float32, device=x.device)
    compiled = x.device.type == "cpu" and native_available(fmt)
    for start in range(0, out_features, tile):
        stop = min(start + tile, out_features)
        part = blocks[start:stop]
        w = dequantize(fmt, part, K, out=buf[: stop - start] if compiled else None)
        y[:, start:stop] = x @ w.t()
    return y


def _check_blocks(fmt: QuantFormat, blocks: torch.Tensor, rows: int, cols: int) -> None:
    """The compiled kernels trust their pointers: check what they will read."""
    want = (rows, fmt.row_bytes(cols))
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want or not blocks.is_contiguous():
        raise ValueError(
            f"{fmt.name} kernel needs contiguous uint8 blocks {want}, got "
            f"{blocks.dtype} {tuple(blocks.shape)}"
        )


def _threads() -> int:
    return torch.get_num_threads()
