"""Which GGML type each tensor gets when a model is quantized to a type.

The rules are llama.cpp's quantizer's (src/llama-quant.cpp), so a model quantized at
load and a GGUF quantized by llama.cpp hold the same types:

- 1-D tensors (norms, biases) stay float;
- the output head -- or the token embeddings when the head is tied to them -- is Q8_0
  for the 4- and 5-bit types: it is the most sensitive matrix (llama.cpp PR #2816 moved
  Falcon-7B Q4_0 perplexity from 8.39 to 7.25 with it). llama.cpp does this for every
  Falcon head; for a llama head (Falcon3) it does it when the rows are not a whole
  number of 256-value K-quant super-blocks and writes Q6_K otherwise. falconet does
  not write K-quants, so a llama head whose rows would take Q6_K gets Q8_0 as well
  (slightly larger, at least as exact);
- every other matrix, token embeddings included, gets the requested type;
- a matrix whose rows are not a whole number of blocks stays float (llama.cpp falls back
  to another type there; falconet never pads rows).
"""

from __future__ import annotations

from falconet.quant import QuantError, get_format
from falconet.quant.mixes import MIXES

# Types falconet quantizes to (the others in falconet.quant.FORMATS are read-only).
QUANT_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
HEAD_TYPE = "q8_0"


def check_quant_type(qtype: str) -> str:
    """A type of QUANT_TYPES, or one of llama.cpp's K-quant mixes (quant/mixes.py), whose
    per-tensor types the model's checkpoint layout works out (models/checkpoint.py)."""
    name = str(qtype).lower()
    if name not in QUANT_TYPES + tuple(MIXES):
        raise QuantError(
            f"unknown quantization type {qtype!r}; choose one of "
            f"{', '.join(QUANT_TYPES + tuple(MIXES))}"
        )
    return name


def tensor_qtype(shape: tuple[int, ...], qtype: str, head: bool = False) -> str | None:
    """The GGML type for a tensor of `shape` in a `qtype` model; None = keep float.
    `head`: the tensor is the output head (the checkpoint layout says which: lm_head, or
    the token embeddings a tied head shares)."""
    if len(shape) != 2:
        return None
    chosen = HEAD_TYPE if head else qtype
    if shape[1] % get_format(chosen).block_size:
        return None
    return chosen
