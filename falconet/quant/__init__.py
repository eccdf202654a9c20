"""Quantized weight storage: GGML tensor types as numpy block codecs (formats.py,
kquants.py), looked up by name or GGML type id.

    fmt = get_format("q8_0")            # or FORMATS[gguf.GGMLQuantizationType.Q8_0]
    raw = fmt.quantize(w)               # float [..., K] -> uint8 [..., K/32*34]
    w2 = fmt.dequantize(raw, w.shape)   # -> float32
"""

from __future__ import annotations

import numpy as np

from falconet.quant.formats import (
    BF16,
    F16,
    F32,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    QuantError,
    QuantFormat,
)
from falconet.quant.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from falconet.quant.tquants import TQ1_0, TQ2_0

_ALL: tuple[QuantFormat, ...] = (
    F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q2_K(), Q3_K(), Q4_K(), Q5_K(),
    Q6_K(),
    TQ1_0(), TQ2_0()
)  # fmt: skip

# Keyed by lowercase GGML name and by GGML type id; gguf.GGMLQuantizationType is an
# IntEnum, so its members work as keys too.
FORMATS: dict[str | int, QuantFormat] = {
    **{f.name: f for f in _ALL},
    **{f.ggml_type: f for f in _ALL},
}


def get_format(qtype: str | int) -> QuantFormat:
    """The format for a GGML name ("q8_0", any case) or type id (8, GGMLQuantizationType.Q8_0)."""
    key = qtype.lower() if isinstance(qtype, str) else qtype
    fmt = FORMATS.get(key)
    if fmt is None:
        supported = ", ".join(f.name for f in _ALL)
        raise QuantError(f"unsupported GGML type {qtype!r}; falconet reads {supported}")
    return fmt


def quantize(x: np.ndarray, qtype: str | int) -> np.ndarray:
    """float [..., K] -> uint8 [..., K // block_size * type_size] in GGML type `qtype`."""
    return get_format(qtype).quantize(x)


def dequantize(raw: np.ndarray, qtype: str | int, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of a `qtype` tensor of `shape` -> float32 array of `shape`."""
    return get_format(qtype).dequantize(raw, shape)


__all__ = [
    "FORMATS",
    "QuantError",
    "QuantFormat",
    "dequantize",
    "get_format",
    "quantize",
]
