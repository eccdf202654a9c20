"""Writing K-quants: float32 super-blocks -> Q2_K..Q6_K bytes, byte for byte what
llama.cpp's reference quantizers (no importance matrix) write.

The per-sub-block scale searches are long float32 loops whose exact operation order
decides the bytes, so they live in C (kernels_kquantize.h); there is no numpy fallback.
A falconet built without its compiled kernels reads K-quant files but cannot write them.
"""

from __future__ import annotations

import numpy as np

from falconet.quant.formats import QuantError

try:  # the compiled kernels are optional (no C compiler at install); the extension
    # module itself, not the falconet.quant package, whose __init__ imports this file
    import falconet.quant._kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

QK_K = 256
# GGML type ids of the K-quants
K_TYPES = {"q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14}


def available() -> bool:
    """Whether this build can write K-quants."""
    return native is not None and hasattr(native, "kquantize")


def quantize_k_blocks(name: str, x: np.ndarray, type_size: int, threads: int = 1) -> np.ndarray:
    """Finite float32 [n, 256] -> uint8 [n, type_size] in K-quant `name` ("q4_k"...).
    Raises QuantError without the compiled kernels. A block whose fp16 scale overflows
    (|x| beyond about 4e6) holds an Inf scale, as the reference writes it; the format's
    overflow check (QuantFormat._overflowed) reports it."""
    if not available():
        raise QuantError(
            f"writing {name} needs falconet's compiled kernels, which this install lacks "
            "(reinstall with a C compiler present); q8_0 and q4_0 work without them"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], type_size), np.uint8)
    native.kquantize(K_TYPES[name], x.ctypes.data, x.shape[0], out.ctypes.data, threads)
    return out
