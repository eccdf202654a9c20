"""GGML K-quants (256-value super-blocks of 16- or 32-value sub-blocks, each with its own
4-, 6- or 8-bit scale): the Q4_K_M / Q5_K_M / Q6_K files llama.cpp users have.

Quantizing runs the compiled reference-exact quantizers (kquantize.py; a build without
them reads K-quants but cannot write them). The decoders follow `dequantize_row_q{2..6}_K` in
ggml-quants.c and match gguf-py bit for bit (tests/test_quant_formats.py,
tests/test_kquant_quantize.py for Q2_K/Q3_K): each value
is at most one float32 rounding away from exact, so the grouping of the multiplies
does not matter.
"""

from __future__ import annotations

import numpy as np

from falconet.quant.formats import QuantFormat, fp16_to_f32
from falconet.quant.kquantize import quantize_k_blocks

QK_K = 256  # values per super-block


def unpack_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed scale bytes of a Q4_K/Q5_K block -> (scales, mins), each uint8
    [n, 8] of 6-bit values, one per 32-value sub-block (ggml's `get_scale_min_k4`):
    sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scale) and 4-7 (min);
    sub-blocks 4-7 split theirs into a low nibble in bytes 8-11 and two high bits in
    the top of bytes 0-3 (scale) or 4-7 (min)."""
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales, mins


def unpack_k_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 128] -> [n, 8, 32]: each 64-value chunk c is 32 bytes holding sub-block
    2c in the low nibbles and sub-block 2c+1 in the high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)  # (n, chunk, 1, l)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # (n, sub-block, l)


class KQuantFormat(QuantFormat):
    """A K-quant: quantized by the compiled reference quantizers."""

    def _quantize(self, x: np.ndarray, out: np.ndarray) -> None:
        raw = quantize_k_blocks(self.name, x, self.type_size)
        out[...] = raw.reshape(-1).view(self.layout)


def scale_and_shift(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """y = (d * scale) * q - (dmin * min) per 32-value sub-block, q [n, 8, 32]. Every
    product is exact in float32, so only the subtraction rounds, as in the reference."""
    scales, mins = unpack_scales_mins(blocks["scales"])
    d = fp16_to_f32(blocks["d"]) * scales  # (n, 8)
    m = fp16_to_f32(blocks["dmin"]) * mins
    y = d[:, :, None] * q.astype(np.float32) - m[:, :, None]
    return y.reshape(-1, QK_K)


class Q4_K(KQuantFormat):
    """Eight 32-value sub-blocks with 6-bit scale and min; x = d*sc*q - dmin*m, q 4 bits."""

    name, ggml_type, block_size = "q4_k", 12, QK_K
    layout = np.dtype(
        [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))]
    )

    def _dequantize(self, blocks):
        return scale_and_shift(blocks, unpack_k_nibbles(blocks["qs"]))


class Q5_K(KQuantFormat):
    """Q4_K plus a fifth bit: bit j of qh[l] is the high bit of value l of sub-block j."""

    name, ggml_type, block_size = "q5_k", 13, QK_K
    layout = np.dtype(
        [
            ("d", "<f2"),
            ("dmin", "<f2"),
            ("scales", "u1", (12,)),
            ("qh", "u1", (32,)),
            ("qs", "u1", (128,)),
        ]
    )

    def _dequantize(self, blocks):
        shifts = np.arange(8, dtype=np.uint8)[None, :, None]
        high = ((blocks["qh"][:, None, :] >> shifts) & 1) << 4  # (n, sub-block, l)
        return scale_and_shift(blocks, unpack_k_nibbles(blocks["qs"]) | high)


class Q6_K(KQuantFormat):
    """Sixteen 16-value sub-blocks with int8 scales; x = d * sc * (q - 32), q 6 bits.

    Each 128-value half h uses ql[64h:64h+64] and qh[32h:32h+32]. Its quarter k
    (values 32k..32k+31) takes its low 4 bits from the low (k < 2) or high (k >= 2)
    nibbles of ql bytes 32*(k % 2) + l, and its top 2 bits from bits 2k..2k+1 of qh[l].
    """

    name, ggml_type, block_size = "q6_k", 14, QK_K
    layout = np.dtype(
        [("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")]
    )

    def _dequantize(self, blocks):
        ql = blocks["ql"].reshape(-1, 2, 1, 2, 32)  # (n, half, 1, ql chunk, l)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # (n, half, k, l)
        shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        high = (blocks["qh"].reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, half, k, l)
        q = ((low | (high << 4)).astype(np.float32) - np.float32(32)).reshape(-1, 16, 16)
        # d * sc * q needs up to 25 bits: one rounding, whichever product goes first
        d = fp16_to_f32(blocks["d"]) * blocks["scales"].astype(np.float32)  # (n, 16)
        return (d[:, :, None] * q).reshape(-1, QK_K)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 64] -> [n, 16, 16] 2-bit quants by 16-value sub-block: in each 128-value
    half h, bits 2j..2j+1 of byte 32h + 16k + l hold value l of sub-block 8h + 2j + k."""
    qs = qs.reshape(-1, 2, 1, 2, 16)  # (n, half, 1, k, l)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None, None]
    return ((qs >> shifts) & 3).reshape(-1, 16, 16)  # (n, half, j, k, l) -> (n, sub-block, l)


class Q2_K(KQuantFormat):
    """Sixteen 16-value sub-blocks with 4-bit scale and min; x = d*sc*q - dmin*m, q 2 bits."""

    name, ggml_type, block_size = "q2_k", 10, QK_K
    layout = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2")])

    def _dequantize(self, blocks):
        s = blocks["scales"]
        d = fp16_to_f32(blocks["d"]) * (s & 0x0F).astype(np.float32)  # (n, 16), exact
        m = fp16_to_f32(blocks["dmin"]) * (s >> 4).astype(np.float32)
        q = unpack_2bit(blocks["qs"]).astype(np.float32)
        return (d[:, :, None] * q - m[:, :, None]).reshape(-1, QK_K)


class Q3_K(KQuantFormat):
    """Sixteen 16-value sub-blocks with 6-bit signed scales; x = d * (sc - 32) * q, q in
    -4..3: two low bits as Q2_K's, the third (set = no -4) in bit 4h + j of hmask[16k + l]
    for value l of sub-block 8h + 2j + k. Scale j keeps its low nibble in byte j (j < 8) or
    the top of byte j - 8, its two high bits at bit 2*(j // 4) of byte 8 + j % 4."""

    name, ggml_type, block_size = "q3_k", 11, QK_K
    layout = np.dtype(
        [("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2")]
    )

    def _dequantize(self, blocks):
        s = blocks["scales"]
        low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)  # (n, 16)
        shifts = (2 * (np.arange(16) // 4)).astype(np.uint8)
        high = (s[:, 8 + np.arange(16) % 4] >> shifts) & 3
        sc = (low | (high << 4)).astype(np.float32) - np.float32(32)
        hm = blocks["hmask"].reshape(-1, 1, 1, 2, 16)  # (n, 1, 1, k, l)
        bit = (np.arange(2)[:, None] * 4 + np.arange(4)[None, :]).astype(np.uint8)  # (h, j)
        set_ = (hm >> bit[None, :, :, None, None]) & 1  # (n, h, j, k, l)
        q = unpack_2bit(blocks["qs"]).astype(np.float32) - 4 * (1 - set_.reshape(-1, 16, 16))
        d = fp16_to_f32(blocks["d"]) * sc  # (n, 16): dl in the reference
        return (d[:, :, None] * q.astype(np.float32)).reshape(-1, QK_K)
