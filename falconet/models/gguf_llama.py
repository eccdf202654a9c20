"""llama.cpp's `llama` architecture in GGUF (Falcon3): tensor names, metadata, Q/K row order.

Names (llama.cpp `src/llama-arch.cpp`, `src/models/llama.cpp`):

    model.embed_tokens  token_embd          layers.N.self_attn.{q,k,v,o}_proj  blk.N.attn_{q,k,v,output}
    model.norm          output_norm         layers.N.mlp.{gate,up,down}_proj   blk.N.ffn_{gate,up,down}
    lm_head             output (absent      layers.N.input_layernorm           blk.N.attn_norm
                        when tied)          layers.N.post_attention_layernorm  blk.N.ffn_norm

Metadata `llama.*`: context_length, embedding_length, block_count, feed_forward_length,
attention.head_count / head_count_kv / key_length / value_length /
layer_norm_rms_epsilon, rope.freq_base / dimension_count, rope.scaling.type / factor,
vocab_size. llama.cpp's loader defaults: head_count_kv = head_count, key_length and
value_length = embedding_length / head_count, rope.dimension_count = key_length (it
requires them equal for llama), freq_base 10000.

Q and K rows. transformers rotates the pairs (x[i], x[i + D/2]) of each head ("rotate
half", NeoX); llama.cpp's llama rope rotates (x[2i], x[2i + 1]). llama.cpp's converter
(`LlamaModel.permute`) therefore reorders the rows of each Q and K head so that GGUF row
2i + j of a head is HF row j*D/2 + i (j = 0, 1; i < D/2), per query head for Q and per
kv head for K. Reading undoes it and writing redoes it; it moves whole rows, so it
applies to quantized blocks (one row = whole blocks) as to floats.

llama3 rope scaling is not metadata: llama.cpp's converter stores it as a tensor,
`rope_freqs.weight`, of head_dim/2 divisors of the rotary frequencies (1 for short
wavelengths, the factor for long ones, interpolated between), computed in fp32 as
`llama3_rope_freqs` does; llama.cpp divides each frequency by its entry. Reading a file
with that tensor gives a LlamaConfig with `rope_freq_factors`. Dynamic (NTK) scaling has
no llama.cpp equivalent for llama and is not written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, RopeScalingType

from falconet.models.llama import Llama
from falconet.models.llama_config import LlamaConfig

ARCH = "llama"
TITLE = "llama"

GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama3 scaling as llama.cpp's converter writes it
EXTRA_TENSORS = (ROPE_FREQS,)  # tensors of the file that are no model weight

Key = Callable[..., Any]  # key(name, kind, default=required) -> the checked `llama.<name>` value


def gguf_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight"""
    if m := BLOCK_RE.fullmatch(hf_name):
        return f"blk.{m[1]}.{BLOCK_NAMES[m[2]]}.{m[3]}"
    module, _, kind = hf_name.rpartition(".")
    return f"{GLOBAL_NAMES[module]}.{kind}"


def tensor_names(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, HF shape) of every tensor a file of this config holds (for a
    ternary model, the float matrices its codes and scales stand for, as llama.cpp's TQ
    types store them)."""
    shapes = Llama.checkpoint_layout(replace(config, bitnet=None)).shapes
    return {gguf_name(n): (n, shape) for n, shape in shapes.items()}


def rows(hf_name: str, config: LlamaConfig, to_file: bool) -> torch.Tensor | None:
    """Row order between HF and GGUF for a Q or K tensor (None for the others):
    `hf = file[rows]` when reading, `file = hf[rows]` when writing (to_file)."""
    if ".self_attn.q_proj." in hf_name:
        heads = config.num_attention_heads
    elif ".self_attn.k_proj." in hf_name:
        heads = config.kv_heads
    else:
        return None
    half = config.head_dim // 2
    rows = torch.arange(heads * config.head_dim)
    if to_file:  # the converter's permute: each head's (2, D/2) rows as (D/2, 2)
        return rows.view(heads, 2, half).transpose(1, 2).reshape(-1)
    return rows.view(heads, half, 2).transpose(1, 2).reshape(-1)


def read_config(
    key: Key, fail: Callable[[str], Exception], tensors: dict[str, Any], common: dict[str, Any]
) -> LlamaConfig:
    """The LlamaConfig a `llama` GGUF describes; `common` holds what every architecture
    reads alike (vocab_size, tied head, token ids, dtype)."""
    freqs = tensors.get(ROPE_FREQS)
    factors = None
    if freqs is not None:
        if freqs.tensor_type.name != "F32" or len(freqs.shape) != 1:
            raise fail(f"tensor {ROPE_FREQS} should be a 1-D F32 tensor")
        factors = tuple(float(f) for f in np.asarray(freqs.data))
    heads, hidden = key("attention.head_count", "int"), key("embedding_length", "int")
    head_dim = key("attention.key_length", "int", hidden // heads if heads else 0)
    if key("attention.value_length", "int", head_dim) != head_dim:
        raise fail(
            f"{ARCH}.attention.value_length differs from key_length; falconet needs them equal"
        )
    if key("rope.dimension_count", "int", head_dim) != head_dim:
        raise fail(
            f"{ARCH}.rope.dimension_count differs from the head size {head_dim}; "
            "partial rotary embeddings are not a llama layout"
        )
    scaling = key("rope.scaling.type", "str", "none")
    if scaling not in ("none", "linear"):
        raise fail(f"rope scaling {scaling!r} is not supported; falconet reads none or linear")
    factor = key("rope.scaling.factor", "float", 0.0) or key("rope.scale_linear", "float", 1.0)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length", "int"),
        num_hidden_layers=key("block_count", "int"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", "int", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length", "int"),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", "float")),
        rope_theta=float(key("rope.freq_base", "float", 10000.0)),
        rope_scaling_type="linear" if scaling == "linear" else None,
        rope_scaling_factor=float(factor) if scaling == "linear" else 1.0,
        rope_freq_factors=factors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        **common,
    )


def problems(config: LlamaConfig) -> list[str]:
    """Why llama.cpp's llama architecture cannot run `config` (empty: it can)."""
    reasons = []
    if config.hidden_act != "silu":
        reasons.append(f"its activation is {config.hidden_act!r}, not silu")
    if config.rope_scaling_type == "dynamic":
        reasons.append("dynamic RoPE scaling has no GGUF equivalent")
    if config.bitnet is not None and config.bitnet.use_rms_norm:
        reasons.append(
            "its ternary projections normalize their inputs (use_rms_norm), which llama.cpp's "
            "llama has no tensor for"
        )
    return reasons


def write_rotary_gqa_metadata(writer: GGUFWriter, config) -> None:
    """The keys every llama-style GQA transformer writes (llama, falcon-h1): sizes, head
    counts and lengths, rope base, RMS norm eps. `config` is a RotaryGQAConfig."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_metadata(writer: GGUFWriter, config: LlamaConfig) -> None:
    """The `llama.*` keys llama.cpp's converter writes for a LlamaForCausalLM."""
    write_rotary_gqa_metadata(writer, config)
    writer.add_rope_dimension_count(config.head_dim)
    if config.rope_scaling_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling_factor)


def extra_tensors(config: LlamaConfig) -> dict[str, np.ndarray]:
    """Tensors the file holds besides the weights: llama3 scaling's rope_freqs."""
    if config.rope_scaling_type == "llama3":
        return {ROPE_FREQS: llama3_rope_freqs(config)}
    if config.rope_freq_factors:
        return {ROPE_FREQS: np.array(config.rope_freq_factors, dtype=np.float32)}
    return {}


def llama3_rope_freqs(config: LlamaConfig) -> np.ndarray:
    """The divisors llama.cpp's converter (`LlamaModel.generate_extra_tensors`) stores for
    llama3 scaling, in its fp32 arithmetic: 1 where the wavelength is under
    original / high_freq_factor, the factor above original / low_freq_factor, and
    1 / ((1 - s) / factor + s) between, s the position of original / wavelength in
    [low_freq_factor, high_freq_factor]."""
    d, factor = config.head_dim, config.rope_scaling_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_position_embeddings
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > original / low, torch.tensor(float(factor)), between)
    out = torch.where(wavelen < original / high, torch.tensor(1.0), out)
    return out.to(torch.float32).numpy()
