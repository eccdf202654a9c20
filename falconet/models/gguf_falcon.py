"""llama.cpp's `falcon` architecture in GGUF: tensor names, metadata, what it cannot run.

Names and keys follow llama.cpp (`src/llama-arch.cpp`, `src/models/falcon.cpp`,
`conversion/falcon.py`). attn_qkv holds [all Q heads | all K heads | all V heads]
("jploski" layout), which is falconet's own layout (models: `regroup_qkv`), so it maps
in as is. llama.cpp's falcon has no linear biases, no ALiBi and no sequential block, so
falcon-rw models cannot be written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gguf import GGUFWriter, RopeScalingType

from falconet.models.falcon import Falcon
from falconet.models.falcon_config import FalconConfig

ARCH = "falcon"
TITLE = "Falcon"
EXTRA_TENSORS: tuple[str, ...] = ()  # tensors of the file that are no model weight

Key = Callable[..., Any]  # key(name, kind, default=required) -> the checked `falcon.<name>` value

GLOBAL_NAMES = {
    "transformer.word_embeddings": "token_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
}
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "ln_mlp": "attn_norm",  # 40B: llama.cpp feeds attn_norm to the FFN ...
    "ln_attn": "attn_norm_2",  # ... and attn_norm_2, when present, to attention
    "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
BLOCK_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")


def gguf_name(hf_name: str) -> str:
    """transformer.h.3.ln_attn.weight -> blk.3.attn_norm_2.weight (names llama.cpp's
    falcon loader asks for)."""
    if m := BLOCK_RE.fullmatch(hf_name):
        return f"blk.{m[1]}.{BLOCK_NAMES[m[2]]}.{m[3]}"
    module, _, kind = hf_name.rpartition(".")
    return f"{GLOBAL_NAMES[module]}.{kind}"


def tensor_names(config: FalconConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, HF shape) of every tensor a file of this config holds."""
    return {
        gguf_name(n): (n, shape) for n, shape in Falcon.checkpoint_layout(config).shapes.items()
    }


def extra_tensors(config: FalconConfig) -> dict:
    return {}


def rows(hf_name: str, config: FalconConfig, to_file: bool) -> None:
    """The file's rows are falconet's (attn_qkv is regrouped from HF before, not here)."""
    return None


def read_config(
    key: Key, fail: Callable[[str], Exception], tensors: dict[str, Any], common: dict[str, Any]
) -> FalconConfig:
    """The FalconConfig a `falcon` GGUF describes; `common` holds what every architecture
    reads alike (vocab_size, tied head, token ids, dtype)."""
    layout = key("tensor_data_layout", "str", "jploski")
    if layout != "jploski":
        raise fail(
            f"{ARCH}.tensor_data_layout is {layout!r}; falconet reads the 'jploski' "
            "QKV layout that llama.cpp's converter writes"
        )
    heads = key("attention.head_count", "int")
    kv = key("attention.head_count_kv", "int", heads)  # llama.cpp's default
    scaling = key("rope.scaling.type", "str", "none")
    if scaling not in ("none", "linear"):
        raise fail(f"rope scaling {scaling!r} is not supported; falconet reads none or linear")
    factor = key("rope.scaling.factor", "float", 0.0) or key("rope.scale_linear", "float", 1.0)
    two_norms = "blk.0.attn_norm_2.weight" in tensors
    if two_norms:  # 40B / 180B
        layout_kw = dict(new_decoder_architecture=True, num_kv_heads=kv)
    elif kv == 1:  # 7B: multi-query, one norm
        layout_kw = dict(multi_query=True, num_kv_heads=1)
    else:  # Falcon2-11B: grouped, one norm
        layout_kw = dict(new_decoder_architecture=True, num_kv_heads=kv, num_ln_in_parallel_attn=1)
    return FalconConfig(
        hidden_size=key("embedding_length", "int"),
        num_hidden_layers=key("block_count", "int"),
        num_attention_heads=heads,
        ffn_hidden_size=key("feed_forward_length", "int"),
        max_position_embeddings=key("context_length", "int"),
        layer_norm_epsilon=float(key("attention.layer_norm_epsilon", "float")),
        rope_theta=float(key("rope.freq_base", "float", 10000.0)),
        rope_scaling_type="linear" if scaling == "linear" else None,
        rope_scaling_factor=float(factor) if scaling == "linear" else 1.0,
        parallel_attn=True,
        alibi=False,
        bias=False,
        activation="gelu",
        **common,
        **layout_kw,
    )


def problems(config: FalconConfig) -> list[str]:
    """Why llama.cpp's falcon architecture cannot run `config` (empty: it can)."""
    reasons = []
    if config.alibi:
        reasons.append(
            "it uses ALiBi (llama.cpp's falcon is rotary only: falcon-rw models cannot run there)"
        )
    if config.block_layout == "sequential":
        reasons.append("its blocks are sequential (llama.cpp's falcon is parallel only)")
    if config.bias:
        reasons.append("its linear layers have biases (llama.cpp's falcon has none)")
    if config.activation != "gelu":
        reasons.append(f"its activation is {config.activation!r}, not gelu")
    if config.rope_scaling_type not in (None, "linear"):
        reasons.append(f"{config.rope_scaling_type} RoPE scaling has no GGUF equivalent")
    return reasons


def write_metadata(writer: GGUFWriter, config: FalconConfig) -> None:
    """The `falcon.*` keys llama.cpp's loader reads."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_tensor_data_layout("jploski")
    if config.rope_theta != 10000.0:  # Falcon2-11B: 500042
        writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling_factor)
