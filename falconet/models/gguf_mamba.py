"""llama.cpp's `mamba` architecture in GGUF (Falcon-Mamba): tensor names, metadata, the
forms llama.cpp stores A and the conv filters in.

Names (llama.cpp `src/llama-arch.cpp`, `conversion/mamba.py`):

    backbone.embeddings  token_embd      layers.N.norm             blk.N.attn_norm
    backbone.norm_f      output_norm     layers.N.mixer.in_proj    blk.N.ssm_in
    lm_head              output (absent  layers.N.mixer.conv1d     blk.N.ssm_conv1d
                         when tied)      layers.N.mixer.x_proj     blk.N.ssm_x
                                         layers.N.mixer.dt_proj    blk.N.ssm_dt
                                         layers.N.mixer.out_proj   blk.N.ssm_out
                                         layers.N.mixer.A_log      blk.N.ssm_a (no suffix)
                                         layers.N.mixer.D          blk.N.ssm_d (no suffix)

Two tensors are stored in another form than transformers': `ssm_a` holds A = -exp(A_log)
(what the scan uses), and `ssm_conv1d.weight` is the (E, 1, K) depthwise filter without
its middle axis, (E, K). Reading turns A back into A_log (see `a_log_from_a`).

Metadata `mamba.*`: embedding_length, block_count, ssm.inner_size (d_inner),
ssm.state_size, ssm.conv_kernel, ssm.time_step_rank, attention.layer_norm_rms_epsilon,
and ssm.dt_b_c_rms: true turns on the weightless RMS norms on dt, B and C that make a
Mamba-1 a Falcon-Mamba. llama.cpp's loader defaults it to false (classic Mamba), which
falconet does not run, so such a file is refused. The converter also writes
context_length 2**20 (no positional limit), feed_forward_length 0 and head_count 0.

llama.cpp's mixer norms use attention.layer_norm_rms_epsilon; transformers uses
`mixer_rms_eps` (1e-6 in every Falcon-Mamba config), which the file does not record:
falconet reads it as that default, so a GGUF runs as the HF folder it came from.

Types: llama.cpp keeps ssm_conv1d and ssm_a F32 in every file (its converter's list of
F32 tensors, and names without `.weight` are never quantized), like the 1-D tensors;
the matrices (ssm_in, ssm_x, ssm_dt, ssm_out, token_embd, output) take the file's type.
falconet's layout says the same (`FalconMamba.checkpoint_layout` keep_float).
llama.cpp's mamba has no in_proj/out_proj biases and requires a conv bias.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from gguf import GGUFWriter

from falconet.models.falcon_mamba import FalconMamba
from falconet.models.falcon_mamba_config import FalconMambaConfig

ARCH = "mamba"
TITLE = "Falcon-Mamba"
EXTRA_TENSORS: tuple[str, ...] = ()  # tensors of the file that are no model weight

Key = Callable[..., Any]  # key(name, kind, default=required) -> the checked `mamba.<name>` value
Transform = Callable[[torch.Tensor], torch.Tensor]

GLOBAL_NAMES = {
    "backbone.embeddings": "token_embd",
    "backbone.norm_f": "output_norm",
    "lm_head": "output",
}
BLOCK_NAMES = {
    "norm": "attn_norm",
    "mixer.in_proj": "ssm_in",
    "mixer.conv1d": "ssm_conv1d",
    "mixer.x_proj": "ssm_x",
    "mixer.dt_proj": "ssm_dt",
    "mixer.out_proj": "ssm_out",
}
PARAMETER_NAMES = {"mixer.A_log": "ssm_a", "mixer.D": "ssm_d"}  # no .weight in the file
BLOCK_RE = re.compile(r"backbone\.layers\.(\d+)\.(.+)")
# What llama.cpp's converter writes for the keys its mamba loader requires but ignores.
CONTEXT_LENGTH = 2**20


def gguf_name(hf_name: str) -> str:
    """backbone.layers.3.mixer.x_proj.weight -> blk.3.ssm_x.weight;
    backbone.layers.3.mixer.A_log -> blk.3.ssm_a"""
    if m := BLOCK_RE.fullmatch(hf_name):
        if m[2] in PARAMETER_NAMES:
            return f"blk.{m[1]}.{PARAMETER_NAMES[m[2]]}"
        module, _, kind = m[2].rpartition(".")
        return f"blk.{m[1]}.{BLOCK_NAMES[module]}.{kind}"
    module, _, kind = hf_name.rpartition(".")
    return f"{GLOBAL_NAMES[module]}.{kind}"


def tensor_names(config: FalconMambaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, shape in the file) of every tensor a file of this config
    holds: the HF shapes, but the conv filters (E, 1, K) are stored as (E, K)."""
    out = {}
    for name, shape in FalconMamba.checkpoint_layout(config).shapes.items():
        if name.endswith(".conv1d.weight"):
            shape = (shape[0], shape[2])
        out[gguf_name(name)] = (name, shape)
    return out


def rows(hf_name: str, config: FalconMambaConfig, to_file: bool) -> None:
    """The file's rows are falconet's."""
    return None


def a_from_a_log(a_log: torch.Tensor) -> torch.Tensor:
    """A = -exp(A_log), in fp32 as transformers computes it in every forward."""
    return -torch.exp(a_log.float())


def a_log_from_a(a: torch.Tensor) -> torch.Tensor:
    """The fp32 A_log whose -exp(A_log) is the file's A again, to the bit.

    log(-A) rounded to fp32 can miss by an ulp (exp and log each round), and then the
    model's -exp(A_log) differs from the A llama.cpp's converter computed from the same
    A_log. One of log(-A)'s fp32 neighbours hits A exactly where the plain value misses
    (measured: every one of a million random values), so it is taken there.
    ValueError for an A that is no decay (not negative and finite)."""
    a = a.float()
    if not bool(((a < 0) & torch.isfinite(a)).all()):
        raise ValueError(
            "it holds values that are not negative finite numbers; llama.cpp stores "
            "A = -exp(A_log), which always is one"
        )
    a_log = torch.log(-a.double()).float()
    for direction in (math.inf, -math.inf):
        near = torch.nextafter(a_log, torch.full_like(a_log, direction))
        better = (a_from_a_log(a_log) != a) & (a_from_a_log(near) == a)
        a_log = torch.where(better, near, a_log)
    return a_log


def _conv_to_model(w: torch.Tensor) -> torch.Tensor:
    return w[:, None, :]  # (E, K) -> (E, 1, K)


def _conv_to_file(w: torch.Tensor) -> torch.Tensor:
    return w[:, 0, :].contiguous()  # (E, 1, K) -> (E, K)


def transforms(config: FalconMambaConfig) -> dict[str, tuple[Transform, Transform]]:
    """HF name -> (file value -> falconet's, falconet's -> file value) for the tensors
    llama.cpp stores in another form. Reading hands them fp32 tensors."""
    out = {}
    for i in range(config.num_hidden_layers):
        m = f"backbone.layers.{i}.mixer."
        out[m + "A_log"] = (a_log_from_a, a_from_a_log)
        out[m + "conv1d.weight"] = (_conv_to_model, _conv_to_file)
    return out


def read_config(
    key: Key, fail: Callable[[str], Exception], tensors: dict[str, Any], common: dict[str, Any]
) -> FalconMambaConfig:
    """The FalconMambaConfig a `mamba` GGUF describes; `common` holds what every
    architecture reads alike (vocab_size, tied head, token ids, dtype)."""
    if not key("ssm.dt_b_c_rms", "bool", False):
        raise fail(
            f"{ARCH}.ssm.dt_b_c_rms is missing or false: a classic Mamba file, without the "
            "RMS norms on dt, B and C that make a Falcon-Mamba; falconet runs Falcon-Mamba only"
        )
    sizes = {}
    for name in ("embedding_length", "block_count", "ssm.inner_size", "ssm.state_size",
                 "ssm.conv_kernel", "ssm.time_step_rank"):  # fmt: skip
        sizes[name] = key(name, "int")
        if sizes[name] == 0:
            raise fail(f"{ARCH}.{name} is 0; it must be a positive integer")
    hidden, inner = sizes["embedding_length"], sizes["ssm.inner_size"]
    if inner % hidden:
        raise fail(
            f"{ARCH}.ssm.inner_size {inner} is not a multiple of {ARCH}.embedding_length "
            f"{hidden}; Falcon-Mamba's d_inner is expand x hidden size"
        )
    return FalconMambaConfig(
        hidden_size=hidden,
        num_hidden_layers=sizes["block_count"],
        expand=inner // hidden,
        state_size=sizes["ssm.state_size"],
        conv_kernel=sizes["ssm.conv_kernel"],
        time_step_rank=sizes["ssm.time_step_rank"],
        layer_norm_epsilon=float(key("attention.layer_norm_rms_epsilon", "float")),
        use_bias=False,
        use_conv_bias=True,
        **common,
    )


def problems(config: FalconMambaConfig) -> list[str]:
    """Why llama.cpp's mamba architecture cannot run `config` (empty: it can)."""
    reasons = []
    if config.use_bias:
        reasons.append("its in_proj and out_proj have biases (llama.cpp's mamba has none)")
    if not config.use_conv_bias:
        reasons.append("its conv1d has no bias (llama.cpp's mamba requires one)")
    return reasons


def write_metadata(writer: GGUFWriter, config: FalconMambaConfig) -> None:
    """The `mamba.*` keys llama.cpp's converter writes for a FalconMambaForCausalLM."""
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_ssm_conv_kernel(config.conv_kernel)
    writer.add_ssm_inner_size(config.intermediate_size)
    writer.add_ssm_state_size(config.state_size)
    writer.add_ssm_time_step_rank(config.time_step_rank)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_ssm_dt_b_c_rms(True)


def extra_tensors(config: FalconMambaConfig) -> dict:
    return {}
