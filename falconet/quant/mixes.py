"""llama.cpp's K-quant mixes: which GGML type each tensor of a Q4_K_M (Q5_K_M, Q6_K,
Q2_K, Q3_K_S/M/L, Q4_K_S, Q5_K_S) file gets, as llama-quantize picks it without an importance matrix
(`llama_tensor_get_type` in src/llama-quant.cpp), so that `falconet convert --type
q4_k_m` writes the file llama-quantize would write from the same weights.

The rules, for the dense architectures falconet writes (no experts):

- only matrices whose name ends in "weight" are quantized (not norms, not conv1d or
  positional tables); everything else stays F32;
- the output head -- or the token embeddings when there is no output.weight (tied) --
  is Q8_0 in a `falcon` file or when its rows are not whole 256-value super-blocks, and
  Q6_K otherwise;
- attention V (attn_v, Falcon's fused attn_qkv) and ffn_down get more bits on some
  layers: for Q4_K_M/Q5_K_M those `use_more_bits` picks (the first and last eighth of
  the layers and every third one in between), for the others a leading few. The layer
  is the count of such tensors seen so far, in llama.cpp's tensor order (layer number,
  then name); Falcon gets its own ffn_down and attn_output rules;
- a matrix whose rows are not whole 256-value super-blocks falls back to a 32-value
  type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0), and to F16 when
  its rows are not whole 32-value blocks either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from falconet.quant.formats import QuantError

QK_K = 256
# --type name -> the type of the bulk of the matrices
MIXES = {
    "q2_k": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}
# llama.cpp's fallback for rows that are not whole super-blocks
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
BLOCK_SIZE = {"q2_k": QK_K, "q3_k": QK_K, "q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K, "q8_0": 32}
# 2-D weights llama.cpp never quantizes (small, or not weights in the matmul sense)
KEEP_FLOAT = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", "pos_embd", "token_types")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


def category(name: str) -> str:
    """llama.cpp's tensor category, by the same name tests in the same order."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight"):
        if part in name:
            return part.removesuffix(".weight")
    for part in ("attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not any(k in name for k in KEEP_FLOAT)


def _order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order: by layer number (none first), then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def mix_types(
    mix: str,
    tensors: Mapping[str, tuple[int, ...]],
    architecture: str,
    n_layer: int,
    n_gqa: int = 1,
) -> dict[str, str]:
    """GGUF tensor name -> lowercase GGML type name ("q4_k", "q6_k", "f32"...) for every
    tensor of a `mix` file ("q4_k_m"...). `tensors` maps GGUF names to shapes in torch
    order (rows last-but-one, row length last); `architecture` is general.architecture;
    n_gqa = attention heads per KV head (Q2_K gives attention V more bits from 4 up)."""
    if mix not in MIXES:
        raise QuantError(f"unknown K-quant mix {mix!r}; choose one of {', '.join(MIXES)}")
    base = MIXES[mix]
    tied = "output.weight" not in tensors
    n_attn_v = sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in tensors)
    seen = {"attn_v": 0, "ffn_down": 0}
    types = {}
    for name in sorted(tensors, key=_order):
        shape = tensors[name]
        if not is_quantized(name, shape):
            types[name] = "f32"
            continue
        kind = category(name)
        cols = shape[-1]
        if kind == "output" or (tied and kind == "token_embd"):
            chosen = "q8_0" if architecture == "falcon" or cols % QK_K else "q6_k"
        elif kind in ("attn_v", "attn_qkv", "attn_kv_b"):
            chosen = _attn_v_type(mix, base, seen["attn_v"], n_attn_v, n_gqa)
            seen["attn_v"] += 1
        elif kind == "ffn_down":
            chosen = _ffn_down_type(mix, base, seen["ffn_down"], n_layer, architecture)
            seen["ffn_down"] += 1
        elif kind == "attn_output":
            chosen = _attn_output_type(mix, base, architecture)
        else:
            chosen = base
        types[name] = _fallback(chosen, cols)
    return types


def _attn_v_type(mix: str, base: str, i: int, n: int, n_gqa: int) -> str:
    if mix == "q2_k":
        return "q4_k" if n_gqa >= 4 else "q3_k"
    if mix == "q3_k_m":
        return "q5_k" if i < 2 else "q4_k"
    if mix == "q3_k_l":
        return "q5_k"
    if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return "q6_k"
    if mix == "q4_k_s" and i < 4:
        return "q5_k"
    return base


def _ffn_down_type(mix: str, base: str, i: int, n: int, architecture: str) -> str:
    falcon = architecture == "falcon"
    if mix == "q2_k":
        return "q3_k"
    if mix == "q3_k_m":
        if i < n // 16:
            return "q5_k"
        return "q4_k" if not falcon or use_more_bits(i, n) else "q3_k"
    if mix == "q3_k_l":
        return "q4_k" if falcon else "q5_k"
    if mix == "q4_k_m":
        if falcon:
            return "q6_k" if i < n // 16 else "q5_k" if use_more_bits(i, n) else "q4_k"
        return "q6_k" if use_more_bits(i, n) else base
    if mix == "q5_k_m" and use_more_bits(i, n):
        return "q6_k"
    if mix == "q4_k_s" and not falcon and i < n // 8:
        return "q5_k"
    return base


def _attn_output_type(mix: str, base: str, architecture: str) -> str:
    if architecture == "falcon":
        return "q4_k" if mix == "q3_k_l" else base
    return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, base)


def _fallback(chosen: str, cols: int) -> str:
    if cols % BLOCK_SIZE[chosen] == 0:
        return chosen
    fallback = FALLBACK.get(chosen, "f16")
    return fallback if cols % 32 == 0 else "f16"
