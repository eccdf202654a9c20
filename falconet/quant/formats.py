"""GGML tensor types as numpy block codecs: the layout of one block as data, and the
functions that turn float32 blocks into those bytes and back.

Each format is a `QuantFormat` with

- `layout`: a packed little-endian numpy structured dtype, one block's fields in byte
  order (so `type_size == layout.itemsize`, and a byte buffer views as fields for free);
- `quantize_blocks(x[n_blocks, block_size]) -> uint8[n_blocks, type_size]` and
  `dequantize_blocks(raw) -> float32[n_blocks, block_size]`, vectorised over blocks;
- the row helpers `quantize(x[..., K])` and `dequantize(raw, shape)`.

Quantized bytes match GGML's reference quantizers (`quantize_row_*_ref` in
ggml-quants.c) byte for byte, and dequantized floats match `dequantize_row_*` bit for
bit; tests/test_quant_formats.py checks both against gguf-py's `gguf.quants`. The
arithmetic is float32 throughout, as in the C reference: a float64 intermediate
rounds a few values in a million differently. gguf-py 0.19 departs from C in one
corner, the sign of the zero scale (Q4_0/Q5_0) or min (Q4_1/Q5_1) of an all-zero
block holding -0.0; we follow C there.

Where the reference has no useful answer we raise instead of guessing:

- NaN or Inf in the input: `QuantError` with the count and the first position.
- A last dimension that is not a multiple of the block size: `QuantError`. Rows are
  never padded; llama.cpp instead picks a different type for such tensors.
- A block whose float16 scale (or Q4_1/Q5_1 min, or an F16/BF16 value) overflows to
  Inf: `QuantError`. The reference would write an Inf scale, which dequantizes the
  whole block to Inf/NaN.

One case is defined by us, because the C reference leaves it to the hardware: when a
block's float32 scale is so small that its reciprocal overflows (|d| < 2**-128: every
value in the block below about 1e-37), the reference converts Inf/NaN to int8. We store
zero quants, which is what x86 builds and gguf-py on x86 produce; the block's float16
scale is zero, so it dequantizes to zeros either way.
"""

from __future__ import annotations

import abc

import numpy as np

from falconet.errors import FalconetError


class QuantError(FalconetError):
    """Data that cannot be quantized to, or decoded from, a GGML tensor type."""


# Blocks handled per step by the row helpers: bounds the float temporaries to a few
# tens of MB whatever the tensor size.
CHUNK_BLOCKS = 1 << 16


class QuantFormat(abc.ABC):
    """One GGML tensor type. Subclasses set the class constants and `_quantize` /
    `_dequantize`; the public methods validate and reshape around them."""

    name: str  # lowercase GGML name: "q8_0"
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # elements per block
    layout: np.dtype  # one block, fields in byte order
    can_quantize: bool = True  # False for the dequantize-only K-quants

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return self.layout.itemsize

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.block_size} values in {self.type_size} bytes>"

    def row_bytes(self, k: int) -> int:
        """Bytes that hold a row of `k` values."""
        self._check_row_length((k,), k)
        return k // self.block_size * self.type_size

    # --- block functions -------------------------------------------------------------

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        """float32 [n_blocks, block_size] -> uint8 [n_blocks, type_size]."""
        self._require_quantizer()
        x = as_float32(x)
        if x.ndim != 2 or x.shape[1] != self.block_size:
            raise QuantError(
                f"{self.name}: quantize_blocks takes [n_blocks, {self.block_size}] values, got shape {x.shape}"
            )
        self._check_finite(x, x.shape)
        return self._quantize_checked(x, blocks_per_row=1)

    def dequantize_blocks(self, raw: np.ndarray) -> np.ndarray:
        """uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size]."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != self.type_size:
            raise QuantError(
                f"{self.name}: dequantize_blocks takes uint8 [n_blocks, {self.type_size}] bytes, "
                f"got {raw.dtype} {raw.shape}"
            )
        blocks = np.ascontiguousarray(raw).view(self.layout).reshape(len(raw))
        with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN scales pass through
            return self._dequantize(blocks)

    # --- row helpers -----------------------------------------------------------------

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float [..., K] -> uint8 [..., K // block_size * type_size], rows quantized
        independently block by block. K must be a multiple of `block_size`."""
        self._require_quantizer()
        x = as_float32(x)
        if x.ndim == 0:
            raise QuantError(f"{self.name}: cannot quantize a scalar; give at least one row")
        k = x.shape[-1]
        self._check_row_length(x.shape, k)
        self._check_finite(x, x.shape)
        blocks = x.reshape(-1, self.block_size)  # (rows * K/bs, bs)
        raw = self._quantize_checked(blocks, blocks_per_row=max(k // self.block_size, 1))
        return raw.reshape(*x.shape[:-1], k // self.block_size * self.type_size)

    def dequantize(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Bytes of a tensor of `shape` (any array; its bytes are read, e.g. a uint8
        view from GGUFReader or a float16 array for f16) -> float32 array of `shape`."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise QuantError(f"{self.name}: cannot dequantize to a scalar shape")
        self._check_row_length(shape, shape[-1])
        n_blocks = int(np.prod(shape, dtype=np.int64)) // self.block_size
        data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if data.size != n_blocks * self.type_size:
            raise QuantError(
                f"{self.name}: a tensor of shape {shape} takes {n_blocks * self.type_size} bytes "
                f"({n_blocks} blocks of {self.type_size}), got {data.size}; "
                "is the data truncated or the type wrong?"
            )
        blocks = data.view(self.layout)
        out = np.empty((n_blocks, self.block_size), np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, n_blocks, CHUNK_BLOCKS):
                out[start : start + CHUNK_BLOCKS] = self._dequantize(
                    blocks[start : start + CHUNK_BLOCKS]
                )
        return out.reshape(shape)

    # --- to be provided by each format ----------------------------------------------

    def _quantize(self, x: np.ndarray, out: np.ndarray) -> None:
        """Fill the structured blocks `out` [n] from finite float32 `x` [n, block_size]."""
        raise QuantError(f"falconet reads {self.name} but cannot write it")

    @abc.abstractmethod
    def _dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """Structured blocks [n] -> float32 [n, block_size]."""

    def _overflowed(self, out: np.ndarray) -> np.ndarray:
        """bool [n]: blocks whose float16 fields (scales, mins, values) became Inf."""
        bad = np.zeros(len(out), bool)
        for field in self.layout.names:
            if self.layout[field].base == np.float16:
                finite = np.isfinite(out[field])  # (n,) or (n, *field shape)
                bad |= ~finite.all(axis=tuple(range(1, finite.ndim)))
        return bad

    # --- validation ------------------------------------------------------------------

    def _require_quantizer(self) -> None:
        if not self.can_quantize:
            raise QuantError(
                f"falconet reads {self.name} but cannot write it; quantize to q8_0, q5_1, q5_0, "
                "q4_1 or q4_0 instead"
            )

    def _quantize_checked(self, x: np.ndarray, blocks_per_row: int) -> np.ndarray:
        out = np.empty(len(x), self.layout)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for start in range(0, len(x), CHUNK_BLOCKS):
                self._quantize(x[start : start + CHUNK_BLOCKS], out[start : start + CHUNK_BLOCKS])
        bad = np.flatnonzero(self._overflowed(out))
        if bad.size:
            b = int(bad[0])
            row, col = divmod(b, blocks_per_row)
            col *= self.block_size
            cols = (
                f"col {col}" if self.block_size == 1 else f"cols {col}..{col + self.block_size - 1}"
            )
            raise QuantError(
                f"{self.name}: {bad.size} block(s) hold values too large for the format: a float16 "
                f"scale or min (at most 65504), or the value itself, would be Inf; the first is "
                f"row {row}, {cols} (max |x| = {np.abs(x[b]).max():.4g}). Rescale the tensor or "
                "keep it in f32."
            )
        return out.view(np.uint8).reshape(len(x), self.type_size)

    def _check_row_length(self, shape: tuple[int, ...], k: int) -> None:
        if k % self.block_size:
            raise QuantError(
                f"{self.name}: the last dimension of shape {tuple(shape)} is {k}, not a multiple of "
                f"the block size {self.block_size}; falconet does not pad rows. Pick a type whose "
                "block size divides it (f16, or q8_0/q4_0 for multiples of 32)."
            )

    def _check_finite(self, x: np.ndarray, shape: tuple[int, ...]) -> None:
        finite = np.isfinite(x)
        if finite.all():
            return
        n_nan = int(np.isnan(x).sum())
        n_inf = int(x.size - finite.sum()) - n_nan
        first = int(np.argmin(finite.reshape(-1)))
        k = shape[-1] if shape else 1
        row, col = divmod(first, k)
        raise QuantError(
            f"{self.name}: cannot quantize {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} Inf, "
            f"counted after conversion to float32); the first is at row {row}, col {col} of a tensor "
            f"of shape {tuple(shape)}"
        )


# --- shared pieces of the block codecs -------------------------------------------------


def as_float32(x: np.ndarray) -> np.ndarray:
    """The input as float32; values beyond its range become Inf, reported by `_check_finite`."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32)


def roundf(v: np.ndarray) -> np.ndarray:
    """C `roundf`: nearest integer, halves away from zero (np.round goes to even).
    Exact in float32: v - trunc(v) has no rounding error."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0).astype(v.dtype)


def reciprocal(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 `d ? 1/d : 0`, as the reference computes the inverse scale, and a mask of
    the blocks where 1/d overflowed (see the module docstring: their quants are 0)."""
    nonzero = d != 0
    inv = np.where(nonzero, np.float32(1) / np.where(nonzero, d, np.float32(1)), np.float32(0))
    return inv, np.isfinite(inv)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """[n, bs] -> [n, 1]: the value of largest magnitude, keeping its sign. Like the
    reference's `if (amax < fabsf(v))` scan, ties go to the first and an all-zero block
    gives +0.0 (never -0.0, which would flip the sign of the stored zero scale)."""
    first = np.argmax(np.abs(x), axis=1)[:, None]
    m = np.take_along_axis(x, first, axis=1)
    return np.where(m == 0, np.float32(0), m)


def block_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, bs] -> ([n, 1], [n, 1]): min and max, the first one on ties (as the reference's
    `if (v < min)` scan picks, which decides the sign of a zero min)."""
    lo = np.take_along_axis(x, np.argmin(x, axis=1)[:, None], axis=1)
    hi = np.take_along_axis(x, np.argmax(x, axis=1)[:, None], axis=1)
    return lo, hi


def truncate_quants(v: np.ndarray, top: int, ok: np.ndarray) -> np.ndarray:
    """The reference's `MIN(top, (int8_t)v)` for non-negative v, then zero quants where
    the inverse scale overflowed."""
    q = np.minimum(np.trunc(v), top).astype(np.uint8)
    return np.where(ok, q, np.uint8(0))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] 4-bit values -> [n, 16]: byte j holds value j low, value j+16 high."""
    return q[:, :16] | (q[:, 16:] << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> [n, 32], the inverse of `pack_nibbles`."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] 5-bit values -> uint32 [n]: bit 4 of value j is bit j."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """uint32 [n] -> uint8 [n, 32] holding 16 where bit j of qh is set."""
    bits = (qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return (bits << 4).astype(np.uint8)


def fp16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 [n] -> float32 [n, 1], ready to broadcast over a block."""
    return h.astype(np.float32)[:, None]


# --- unquantized types -----------------------------------------------------------------


class F32(QuantFormat):
    name, ggml_type, block_size = "f32", 0, 1
    layout = np.dtype([("value", "<f4")])

    def _quantize(self, x, out):
        out["value"] = x[:, 0]

    def _dequantize(self, blocks):
        return blocks["value"].astype(np.float32).reshape(-1, 1)


class F16(F32):
    """IEEE half; rounds to nearest even. Values >= 65520 overflow: QuantError."""

    name, ggml_type, block_size = "f16", 1, 1
    layout = np.dtype([("value", "<f2")])


class BF16(QuantFormat):
    """The top 16 bits of a float32, rounded to nearest even (subnormals kept, as in
    ggml's `ggml_compute_fp32_to_bf16`); stored as raw bits since numpy has no bf16."""

    name, ggml_type, block_size = "bf16", 30, 1
    layout = np.dtype([("bits", "<u2")])

    def _quantize(self, x, out):
        u = x[:, 0].view(np.uint32)
        out["bits"] = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16

    def _dequantize(self, blocks):
        return (blocks["bits"].astype(np.uint32) << 16).view(np.float32).reshape(-1, 1)

    def _overflowed(self, out):
        return (out["bits"] & 0x7F80) == 0x7F80


# --- legacy 32-value block types -------------------------------------------------------


class Q8_0(QuantFormat):
    """d = absmax / 127, q = roundf(x * (1/d)) in int8; x ~ q * d."""

    name, ggml_type, block_size = "q8_0", 8, 32
    layout = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])

    def _quantize(self, x, out):
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        inv, ok = reciprocal(d)
        out["d"] = d[:, 0]
        out["qs"] = np.where(ok, roundf(x * inv), 0).astype(np.int8)

    def _dequantize(self, blocks):
        return fp16_to_f32(blocks["d"]) * blocks["qs"].astype(np.float32)


class Q4_0(QuantFormat):
    """d = m / -8 for the signed absmax m (so m lands exactly on q = 0),
    q = min(15, trunc(x * (1/d) + 8.5)) in 4 bits, so halves round up; x ~ (q - 8) * d."""

    name, ggml_type, block_size = "q4_0", 2, 32
    layout = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])

    def _quantize(self, x, out):
        out["qs"] = pack_nibbles(offset_quants(x, 8, out))

    def _dequantize(self, blocks):
        q = unpack_nibbles(blocks["qs"]).astype(np.float32) - np.float32(8)
        return q * fp16_to_f32(blocks["d"])


def offset_quants(x: np.ndarray, offset: int, out: np.ndarray) -> np.ndarray:
    """The Q4_0/Q5_0 rule: d = m / -offset for the signed absmax m (so m lands exactly on
    q = 0), q = min(2*offset - 1, trunc(x/d + offset + 0.5)); stores d in `out` and
    returns q."""
    d = signed_absmax(x) / np.float32(-offset)
    inv, ok = reciprocal(d)
    out["d"] = d[:, 0]
    return truncate_quants(x * inv + np.float32(offset + 0.5), 2 * offset - 1, ok)


def affine_quants(x: np.ndarray, levels: int, out: np.ndarray) -> np.ndarray:
    """The Q4_1/Q5_1 rule: d = (max - min) / levels, m = min, q = trunc((x - m)/d + 0.5)
    capped at `levels`; stores d and m in `out` and returns q."""
    lo, hi = block_min_max(x)
    d = (hi - lo) / np.float32(levels)
    inv, ok = reciprocal(d)
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    return truncate_quants((x - lo) * inv + np.float32(0.5), levels, ok)


class Q4_1(QuantFormat):
    """d = (max - min) / 15, m = min, q = min(15, trunc((x - min)/d + 0.5));
    x ~ q * d + m."""

    name, ggml_type, block_size = "q4_1", 3, 32
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])

    def _quantize(self, x, out):
        q = affine_quants(x, 15, out)
        out["qs"] = pack_nibbles(q)

    def _dequantize(self, blocks):
        q = unpack_nibbles(blocks["qs"]).astype(np.float32)
        return q * fp16_to_f32(blocks["d"]) + fp16_to_f32(blocks["m"])


class Q5_0(QuantFormat):
    """Q4_0 with 5 bits: d = m / -16, q = min(31, trunc(x/d + 16.5)); the low nibbles
    pack as in Q4_0 and bit 4 of value j is bit j of the little-endian u32 qh."""

    name, ggml_type, block_size = "q5_0", 6, 32
    layout = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])

    def _quantize(self, x, out):
        q = offset_quants(x, 16, out)
        out["qh"] = pack_high_bits(q)
        out["qs"] = pack_nibbles(q & 0x0F)

    def _dequantize(self, blocks):
        q = unpack_nibbles(blocks["qs"]) | unpack_high_bits(blocks["qh"])
        return (q.astype(np.float32) - np.float32(16)) * fp16_to_f32(blocks["d"])


class Q5_1(QuantFormat):
    """Q4_1 with 5 bits (d = (max - min) / 31), bits packed as in Q5_0. llama.cpp writes
    it for rows a Q5_K file cannot hold, e.g. Falcon-7B's 4544-wide ones."""

    name, ggml_type, block_size = "q5_1", 7, 32
    layout = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])

    def _quantize(self, x, out):
        q = affine_quants(x, 31, out)
        out["qh"] = pack_high_bits(q)
        out["qs"] = pack_nibbles(q & 0x0F)

    def _dequantize(self, blocks):
        q = unpack_nibbles(blocks["qs"]) | unpack_high_bits(blocks["qh"])
        return q.astype(np.float32) * fp16_to_f32(blocks["d"]) + fp16_to_f32(blocks["m"])
