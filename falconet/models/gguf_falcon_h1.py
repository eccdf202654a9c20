"""llama.cpp's `falcon-h1` architecture in GGUF: tensor names, metadata, muP multipliers.

Names (llama.cpp `conversion/falcon_h1.py` on `conversion/mamba.py` Mamba2Model, and
its falcon-h1 loader):

    model.embed_tokens        token_embd     layers.N.self_attn.{q,k,v,o}_proj  blk.N.attn_{q,k,v,output}
    model.final_layernorm     output_norm    layers.N.feed_forward.{gate,up,down}_proj  blk.N.ffn_{gate,up,down}
    lm_head                   output         layers.N.input_layernorm   blk.N.attn_norm
    layers.N.pre_ff_layernorm blk.N.ffn_norm (no ".weight": the converter's mapping entry
                                              carries the suffix itself)
    layers.N.mamba.in_proj    blk.N.ssm_in   layers.N.mamba.conv1d      blk.N.ssm_conv1d
    layers.N.mamba.dt_bias    blk.N.ssm_dt.bias
    layers.N.mamba.A_log      blk.N.ssm_a    layers.N.mamba.D           blk.N.ssm_d
    layers.N.mamba.norm       blk.N.ssm_norm layers.N.mamba.out_proj    blk.N.ssm_out

Reshaped on the way: conv1d (C, 1, K) is stored (C, K); A and D (H,) as (H, 1); the gated
norm (E,) as (G, E/G), one row per group. ssm_a holds A = -exp(A_log), not A_log.
Q/K rows are not permuted: llama.cpp ropes falcon-h1 NeoX-style, as transformers does.

Metadata `falcon-h1.*`: the llama keys (context_length, embedding_length, block_count,
feed_forward_length, attention.head_count / head_count_kv / key_length / value_length /
layer_norm_rms_epsilon, rope.freq_base, vocab_size) and Mamba-2's ssm.inner_size
(mamba_d_ssm), ssm.state_size, ssm.conv_kernel, ssm.group_count and
ssm.time_step_rank (llama.cpp's name for the number of Mamba heads).

Two forms of the muP multipliers exist:

- folded (mainline llama.cpp since July 2025, and falconet's writer): the converter
  multiplies them into the weights -- embedding_multiplier into token_embd,
  lm_head_multiplier into output, attention_in into Q/K/V, key_multiplier into K,
  attention_out into attn_output, ssm_in into ssm_in, the five ssm_multipliers into
  ssm_in's z/x/B/C/dt rows, ssm_out into ssm_out, mlp_multipliers into ffn_gate and
  ffn_down -- and writes no multiplier key. Read as a model with every multiplier 1.0.
- unfolded (TII's llama.cpp-Falcon-H1 fork, May 2025, which made the first Falcon-H1
  GGUFs): the weights are the checkpoint's, the scalar multipliers are keys
  (falcon-h1.key_multiplier, .embedding_multiplier, .lm_head_multiplier,
  .attention_in/out_multiplier, .ssm_in/out_multiplier, .mlp_gate/down_multiplier) and
  the ssm_multipliers a per-layer tensor blk.N.ssm_mup_vec (in_proj rows long, flag
  falcon-h1.ssm.has_mup); it also names pre_ff_layernorm blk.N.ffn_pre_norm and writes
  ssm.mamba_d_ssm, ssm.mamba_chunk_size and mamba_norm_before_gate. Read with the
  multipliers set from those keys.

Folding is exact up to one fp32 rounding per weight (W·m), far below 1e-4 in the logits.
A tied model whose embedding and head multipliers differ cannot share one folded matrix
(llama.cpp's converter folds the embedding multiplier and so scales the head wrong);
falconet writes such a model untied, with output = embeddings x lm_head_multiplier.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter

from falconet.models.falcon_h1 import FalconH1
from falconet.models.falcon_h1_config import MULTIPLIERS, FalconH1Config
from falconet.models.gguf_llama import write_rotary_gqa_metadata
from falconet.models.gguf_mamba import a_log_from_a

ARCH = "falcon-h1"
TITLE = "Falcon-H1"
MUP_VEC = "blk.*.ssm_mup_vec"  # the unfolded form's ssm_multipliers, one per layer
EXTRA_TENSORS = (MUP_VEC,)  # tensors of the file that are no model weight (globs)

# key(name, kind, default=required) -> the checked `falcon-h1.<name>` value
Key = Callable[..., Any]

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.final_layernorm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "pre_ff_layernorm.weight": "ffn_norm",
    "feed_forward.gate_proj": "ffn_gate",
    "feed_forward.up_proj": "ffn_up",
    "feed_forward.down_proj": "ffn_down",
    "mamba.in_proj": "ssm_in",
    "mamba.conv1d": "ssm_conv1d",
    "mamba.dt_bias": "ssm_dt.bias",
    "mamba.A_log": "ssm_a",
    "mamba.D": "ssm_d",
    "mamba.norm": "ssm_norm",
    "mamba.out_proj": "ssm_out",
}
BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# TII's fork named the pre-FFN norm differently (see the module docstring).
FORK_NAMES = {re.compile(r"blk\.(\d+)\.ffn_pre_norm"): r"blk.\1.ffn_norm"}
# The unfolded form's keys: falcon-h1.<field> for the scalar multipliers (MULTIPLIERS),
# and these two for mlp_multipliers.
FORK_MLP = ("mlp_gate_multiplier", "mlp_down_multiplier")


def gguf_name(hf_name: str) -> str:
    """model.layers.3.mamba.A_log -> blk.3.ssm_a; model.layers.3.self_attn.q_proj.bias ->
    blk.3.attn_q.bias"""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    m = BLOCK_RE.fullmatch(hf_name)
    if m is None:
        raise KeyError(hf_name)
    rest = m[2]
    if rest in BLOCK_NAMES:
        return f"blk.{m[1]}.{BLOCK_NAMES[rest]}"
    module, _, kind = rest.rpartition(".")
    return f"blk.{m[1]}.{BLOCK_NAMES[module]}.{kind}"


def file_shape(hf_name: str, shape: tuple[int, ...], config: FalconH1Config) -> tuple[int, ...]:
    """The shape the file stores HF tensor `hf_name` (of HF `shape`) in."""
    if hf_name.endswith("mamba.conv1d.weight"):
        return (shape[0], shape[2])  # (C, 1, K) -> (C, K)
    if hf_name.endswith(("mamba.A_log", "mamba.D")):
        return (shape[0], 1)
    if hf_name.endswith("mamba.norm.weight"):
        groups = config.mamba_n_groups
        return (groups, shape[0] // groups)
    return shape


def tensor_names(config: FalconH1Config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, shape in the file) of every tensor a file of this config holds."""
    shapes = FalconH1.checkpoint_layout(config).shapes
    return {gguf_name(n): (n, file_shape(n, s, config)) for n, s in shapes.items()}


def canonical_name(name: str) -> str:
    """A file tensor's name as tensor_names spells it (the fork's names mapped)."""
    for pattern, repl in FORK_NAMES.items():
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return name


def rows(hf_name: str, config: FalconH1Config, to_file: bool) -> None:
    """Rows are the checkpoint's (no Q/K permutation: NeoX rope on both sides)."""
    return None


# ---- the folded multipliers ------------------------------------------------------------


def file_config(config: FalconH1Config) -> FalconH1Config:
    """The config a file written from `config` describes (what reading it gives back):
    every multiplier folded into the weights, so 1.0, and the head untied when the
    embedding and head multipliers differ (one matrix cannot hold both)."""
    tied = config.tie_word_embeddings and config.embedding_multiplier == config.lm_head_multiplier
    return dataclasses.replace(
        config,
        **{m: 1.0 for m in MULTIPLIERS},
        ssm_multipliers=(1.0,) * 5,
        mlp_multipliers=(1.0, 1.0),
        tie_word_embeddings=tied,
    )


def _multipliers(hf_name: str, config: FalconH1Config) -> tuple[list[Any], Any]:
    """(factors of the weight, factor of the bias) of a layer: transformers computes
    layer(x · input) · output, so W folds both and the bias the output one only. The
    weight's factors come in llama.cpp's converter's order, so that the fp32 products
    round as its do (the same bytes). Per-row factors are (rows, 1) columns."""
    c = config
    part = hf_name.split(".")[-2]
    if hf_name == "model.embed_tokens.weight":
        return [c.embedding_multiplier], 1.0
    if hf_name == "lm_head.weight":
        return [c.lm_head_multiplier], 1.0
    if part == "in_proj":
        E, GN = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
        sizes = (E, E, GN, GN, c.mamba_n_heads)  # z, x, B, C, dt rows
        per_row = torch.cat(
            [torch.full((n,), float(m)) for n, m in zip(sizes, c.ssm_multipliers, strict=True)]
        )
        return [c.ssm_in_multiplier, per_row[:, None]], per_row
    a_in = c.attention_in_multiplier
    return {
        "q_proj": ([a_in], 1.0),
        "k_proj": ([c.key_multiplier, a_in], c.key_multiplier),
        "v_proj": ([a_in], 1.0),
        "o_proj": ([c.attention_out_multiplier], c.attention_out_multiplier),
        "out_proj": ([c.ssm_out_multiplier], c.ssm_out_multiplier),
        "gate_proj": ([c.mlp_multipliers[0]], c.mlp_multipliers[0]),
        "down_proj": ([c.mlp_multipliers[1]], c.mlp_multipliers[1]),
    }.get(part, ([], 1.0))


def to_file(hf_name: str, config: FalconH1Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF tensor -> the file's (fp32): multipliers folded (config's, the HF folder's),
    A_log as A, and the reshapes above. lm_head.weight of an untied write comes from
    the embeddings and gets the head's multiplier."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if hf_name.endswith("mamba.A_log"):
            return -torch.exp(t).reshape(-1, 1)
        shape = file_shape(hf_name, tuple(t.shape), config)
        if shape != tuple(t.shape):
            return t.reshape(shape)
        factors, bias_factor = _multipliers(hf_name, config)
        if hf_name.endswith(".bias"):
            return t * bias_factor
        for f in factors:
            t = t * f
        return t

    return convert


def from_file(
    hf_name: str, config: FalconH1Config
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The file's float tensor -> falconet's (HF) layout, or None for those stored as they
    are: ssm_a back to A_log, and the reshapes undone."""
    if hf_name.endswith("mamba.A_log"):
        # the fp32 A_log whose -exp() is the file's A to the bit (gguf_mamba)
        return lambda a: a_log_from_a(a.reshape(-1))
    if hf_name.endswith("mamba.D") or hf_name.endswith("mamba.norm.weight"):
        return lambda t: t.reshape(-1)
    if hf_name.endswith("mamba.conv1d.weight"):
        return lambda t: t.reshape(t.shape[0], 1, t.shape[1])
    return None


# ---- reading ----------------------------------------------------------------------------


def read_config(
    key: Key, fail: Callable[[str], Exception], tensors: dict[str, Any], common: dict[str, Any]
) -> FalconH1Config:
    """The FalconH1Config a `falcon-h1` GGUF describes, folded or unfolded (module
    docstring); `common` holds what every architecture reads alike."""
    heads, hidden = key("attention.head_count", "int"), key("embedding_length", "int")
    kv = key("attention.head_count_kv", "int", heads)
    if not heads or not kv or heads % kv:
        raise fail(
            f"{ARCH}.attention.head_count {heads} is not a multiple of "
            f"{ARCH}.attention.head_count_kv {kv}"
        )
    head_dim = key("attention.key_length", "int", hidden // heads)
    if key("attention.value_length", "int", head_dim) != head_dim:
        raise fail(
            f"{ARCH}.attention.value_length differs from key_length; falconet needs them equal"
        )
    # the fork's ssm.inner_size is mamba_expand x hidden; its ssm.mamba_d_ssm the width
    d_ssm = key("ssm.mamba_d_ssm", "int", None) or key("ssm.inner_size", "int")
    n_heads = key("ssm.time_step_rank", "int")
    groups = key("ssm.group_count", "int")
    d_state = key("ssm.state_size", "int")
    if not n_heads or d_ssm % n_heads:
        raise fail(
            f"{ARCH}.ssm.time_step_rank {n_heads} (the Mamba heads) does not divide "
            f"{ARCH}.ssm.inner_size {d_ssm}"
        )
    if not groups or n_heads % groups:
        raise fail(
            f"{ARCH}.ssm.group_count {groups} does not divide {ARCH}.ssm.time_step_rank {n_heads}"
        )
    d_head = key("ssm.head_dim", "int", d_ssm // n_heads)
    if d_head * n_heads != d_ssm:
        raise fail(
            f"{ARCH}.ssm.head_dim {d_head} x {ARCH}.ssm.time_step_rank {n_heads} is not "
            f"{ARCH}.ssm.inner_size {d_ssm}"
        )
    rope_theta = key("rope.freq_base", "float", None) or key("rope_theta", "float", 10000.0)
    config = FalconH1Config(
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length", "int"),
        num_hidden_layers=key("block_count", "int"),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=key("context_length", "int"),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", "float")),
        rope_theta=float(rope_theta),
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        projectors_bias="blk.0.ssm_out.bias" in tensors,
        mamba_proj_bias="blk.0.ssm_in.bias" in tensors,
        mamba_d_ssm=d_ssm,
        mamba_n_heads=n_heads,
        mamba_d_head=d_head,
        mamba_n_groups=groups,
        mamba_d_state=d_state,
        mamba_d_conv=key("ssm.conv_kernel", "int"),
        mamba_chunk_size=key("ssm.mamba_chunk_size", "int", 256),
        mamba_conv_bias="blk.0.ssm_conv1d.bias" in tensors,
        mamba_rms_norm="blk.0.ssm_norm.weight" in tensors,
        # llama.cpp gates, then norms; the fork wrote which order the model used
        mamba_norm_before_gate=key("mamba_norm_before_gate", "bool", False),
        **common,
    )
    return dataclasses.replace(config, **_unfolded(key, fail, tensors, config))


def _unfolded(
    key: Key, fail: Callable[[str], Exception], tensors: dict[str, Any], config: FalconH1Config
) -> dict[str, Any]:
    """The multipliers an unfolded (fork) file keeps apart from its weights; {} for a
    folded one."""
    out: dict[str, Any] = {}
    for name in MULTIPLIERS:
        value = key(name, "float", None)
        if value is not None:
            out[name] = float(value)
    mlp = [key(name, "float", None) for name in FORK_MLP]
    if any(v is not None for v in mlp):
        out["mlp_multipliers"] = tuple(1.0 if v is None else float(v) for v in mlp)
    vectors = sorted(n for n in tensors if re.fullmatch(r"blk\.\d+\.ssm_mup_vec", n))
    if key("ssm.has_mup", "bool", False) or vectors:
        out["ssm_multipliers"] = _ssm_multipliers(fail, tensors, vectors, config)
    return out


def _ssm_multipliers(
    fail: Callable[[str], Exception],
    tensors: dict[str, Any],
    names: list[str],
    config: FalconH1Config,
) -> tuple[float, ...]:
    """The five z/x/B/C/dt multipliers of the fork's per-layer mup vectors: one value per
    slice, the same in every layer (as transformers builds them from the config)."""
    wanted = [f"blk.{i}.ssm_mup_vec" for i in range(config.num_hidden_layers)]
    if names != sorted(wanted):
        missing = sorted(set(wanted) - set(names)) or sorted(set(names) - set(wanted))
        raise fail(f"{ARCH}.ssm.has_mup is set but tensor {missing[0]} is missing or unexpected")
    E, GN = config.mamba_d_ssm, config.mamba_n_groups * config.mamba_d_state
    sizes = (E, E, GN, GN, config.mamba_n_heads)
    vectors = []
    for name in wanted:
        t = tensors[name]
        if t.tensor_type.name != "F32" or int(np.prod(t.shape)) != sum(sizes):
            raise fail(f"tensor {name} should be F32 with {sum(sizes)} values (ssm_in's rows)")
        vectors.append(np.asarray(t.data, dtype=np.float32).reshape(-1))
        if not np.array_equal(vectors[-1], vectors[0]):
            raise fail(f"tensor {name} differs from blk.0.ssm_mup_vec; falconet has one per model")
    values, start = [], 0
    for n in sizes:
        part = vectors[0][start : start + n]
        if not np.all(part == part[0]) or not math.isfinite(float(part[0])):
            raise fail("blk.0.ssm_mup_vec is not one value per z/x/B/C/dt slice")
        values.append(float(part[0]))
        start += n
    return tuple(values)


# ---- writing ----------------------------------------------------------------------------


def problems(config: FalconH1Config) -> list[str]:
    """Why llama.cpp's falcon-h1 architecture cannot run `config` (empty: it can)."""
    reasons = []
    if config.hidden_act != "silu":
        reasons.append(f"its activation is {config.hidden_act!r}, not silu")
    if config.rope_scaling_type is not None:
        reasons.append(
            f"{config.rope_scaling_type} RoPE scaling (llama.cpp's falcon-h1 reads none)"
        )
    if tuple(config.time_step_limit) != (0.0, math.inf):
        reasons.append("a time_step_limit (llama.cpp's Mamba-2 does not clamp the time step)")
    if config.mamba_rms_norm and config.mamba_norm_before_gate:
        reasons.append(
            "mamba_norm_before_gate (llama.cpp's gated norm gates first, then normalizes)"
        )
    biases = [n for n in ("attention_bias", "mlp_bias", "mamba_proj_bias", "projectors_bias")
              if getattr(config, n)]  # fmt: skip
    if biases:
        reasons.append(
            f"linear biases ({', '.join(biases)}; llama.cpp's falcon-h1 has no ssm_in/ssm_out "
            "bias, and no released Falcon-H1 has any)"
        )
    return reasons


def write_metadata(writer: GGUFWriter, config: FalconH1Config) -> None:
    """The `falcon-h1.*` keys llama.cpp's converter writes (folded form: no multipliers)."""
    write_rotary_gqa_metadata(writer, config)
    writer.add_ssm_conv_kernel(config.mamba_d_conv)
    writer.add_ssm_inner_size(config.mamba_d_ssm)
    writer.add_ssm_state_size(config.mamba_d_state)
    writer.add_ssm_time_step_rank(config.mamba_n_heads)
    writer.add_ssm_group_count(config.mamba_n_groups)


def extra_tensors(config: FalconH1Config) -> dict[str, np.ndarray]:
    return {}
