"""GGML's ternary types TQ1_0 and TQ2_0 (llama.cpp, for BitNet b1.58 models such as
Falcon-E and Falcon3-*-1.58bit): 256 values per block, each -1, 0 or +1 times the
block's float16 scale d = max|x|. Codes are x / d rounded (C `lroundf`) plus 1, so 0..2.

- TQ2_0 (66 bytes, 2.0625 bits per weight): qs[64] then d. Each 128-value half of the
  block is 32 bytes; byte m of half h holds values h*128 + n*32 + m at bits 2n..2n+1.
- TQ1_0 (54 bytes, 1.6875 bpw): five trits per byte in qs[48] (bytes 0-31: values
  n*32 + m of the first 160, bytes 32-47: values 160 + n*16 + m), four per byte in
  qh[4] (values 240 + n*4 + m), then d. A byte holds its trits as the base-3 number
  t0 t1 t2 t3 t4 (t0 most significant; qh's fifth trit is 0) scaled to 0..255 by
  ceil(v * 256 / 243), so that multiplying the byte by 3^n (mod 256) moves trit n to
  the top, where (b * 3) >> 8 reads it.

Both follow quantize_row_tq{1,2}_0_ref / dequantize_row_tq{1,2}_0 in ggml-quants.c and
match gguf-py's codecs byte for byte (tests/test_quant_formats.py). On ternary input
(every value -s, 0 or s in a block) they are lossless up to d's float16 rounding.
"""

from __future__ import annotations

import abc

import numpy as np

from falconet.quant.formats import (
    CHUNK_BLOCKS,
    QuantError,
    QuantFormat,
    fp16_to_f32,
    reciprocal,
    roundf,
)

QK_K = 256
POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def ternary_codes(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> codes uint8 [n, 256] in 0..2, storing d = max|x| in out["d"]."""
    d = np.abs(x).max(axis=1, keepdims=True)
    inv, ok = reciprocal(d)
    out["d"] = d[:, 0].astype(np.float16)
    q = roundf(x * inv).clip(-1, 1) + 1  # |x / d| <= 1; clip only guards rounding
    return np.where(ok, q, 1).astype(np.uint8)


def pack_trits(codes: np.ndarray, trits: int) -> np.ndarray:
    """uint8 [n, trits, width] codes -> [n, width] bytes: base 3 with the first trit
    most significant, padded to five trits, scaled to 0..255 (rounding up)."""
    v = np.zeros(codes.shape[::2], dtype=np.uint16)
    for t in range(trits):
        v = v * 3 + codes[:, t]
    v = v * 3 ** (5 - trits)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def unpack_trits(b: np.ndarray, trits: int) -> np.ndarray:
    """uint8 [n, width] -> codes [n, trits, width]: trit t is the top of b * 3^t (mod 256)."""
    shifted = b[:, None, :] * POW3[:trits, None]  # uint8: wraps mod 256 as in C
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def scaled(blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(code - 1) * d per value, as dequantize_row_tq*: an exact product in float32."""
    d = fp16_to_f32(blocks["d"])  # (n, 1)
    return (codes.astype(np.float32) - 1) * d


class TernaryFormat(QuantFormat):
    """A ternary type: blocks of 256 codes in 0..2 and a float16 d. `_pack` / `_codes`
    convert between the codes and the type's bytes, so one type's blocks become the
    other's without a float in between (`transcode`)."""

    block_size = QK_K

    def _quantize(self, x, out):
        self._pack(ternary_codes(x, out), out)

    def _dequantize(self, blocks):
        return scaled(blocks, self._codes(blocks))

    @abc.abstractmethod
    def _pack(self, codes: np.ndarray, out: np.ndarray) -> None:
        """Codes uint8 [n, 256] -> the qs (and qh) fields of the structured blocks `out`."""

    @abc.abstractmethod
    def _codes(self, blocks: np.ndarray) -> np.ndarray:
        """Structured blocks [n] -> codes uint8 [n, 256] in value order."""


class TQ2_0(TernaryFormat):
    """Four 2-bit codes per byte; x = (q - 1) * d."""

    name, ggml_type = "tq2_0", 35
    layout = np.dtype([("qs", "u1", (64,)), ("d", "<f2")])

    def _pack(self, codes, out):
        q = codes.reshape(-1, 2, 4, 32)  # (n, half, n, m)
        packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        out["qs"] = packed.reshape(-1, 64)

    def _codes(self, blocks):
        qs = blocks["qs"].reshape(-1, 2, 1, 32)
        codes = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (n, half, 4, 32)
        return codes.reshape(-1, QK_K)


class TQ1_0(TernaryFormat):
    """Five trits per byte (3^5 = 243 <= 256), four in the last 4 bytes; x = (q - 1) * d."""

    name, ggml_type = "tq1_0", 34
    layout = np.dtype([("qs", "u1", (48,)), ("qh", "u1", (4,)), ("d", "<f2")])

    def _pack(self, codes, out):
        first = pack_trits(codes[:, :160].reshape(-1, 5, 32), 5)
        second = pack_trits(codes[:, 160:240].reshape(-1, 5, 16), 5)
        out["qs"] = np.concatenate([first, second], axis=1)
        out["qh"] = pack_trits(codes[:, 240:].reshape(-1, 4, 4), 4)

    def _codes(self, blocks):
        qs, qh = blocks["qs"], blocks["qh"]
        return np.concatenate(
            [
                unpack_trits(qs[:, :32], 5).reshape(-1, 160),
                unpack_trits(qs[:, 32:], 5).reshape(-1, 80),
                unpack_trits(qh, 4).reshape(-1, 16),
            ],
            axis=1,
        )


def transcode(raw: np.ndarray, src: TernaryFormat, dst: TernaryFormat) -> np.ndarray:
    """Bytes of `src` blocks (uint8 [..., n * src.type_size]) -> the same codes and scales
    as `dst` blocks (uint8 [..., n * dst.type_size]): lossless both ways, since both types
    hold any code 0..2 and the same float16 d. TQ1_0 becomes TQ2_0 this way at load, the
    layout the compiled kernel reads (2.06 instead of 1.69 bits per weight)."""
    raw = np.ascontiguousarray(raw)
    lead, width = raw.shape[:-1], raw.shape[-1]
    if raw.dtype != np.uint8 or width % src.type_size:
        raise QuantError(
            f"{src.name}: rows of whole {src.type_size}-byte blocks expected, got "
            f"{raw.dtype} {raw.shape}"
        )
    n = width // src.type_size
    out = np.empty((*lead, n * dst.type_size), dtype=np.uint8)
    blocks_in = raw.reshape(-1).view(src.layout)
    blocks_out = out.reshape(-1).view(dst.layout)
    for start in range(0, len(blocks_in), CHUNK_BLOCKS):
        part = blocks_in[start : start + CHUNK_BLOCKS]
        target = blocks_out[start : start + CHUNK_BLOCKS]
        dst._pack(src._codes(part), target)
        target["d"] = part["d"]
    return out
