"""FalconConfig: real Falcon config.json files (current and legacy RefinedWeb forms), the
values derived from them checked against transformers, and bad configs as ConfigError."""

from __future__ import annotations

import json

import pytest
import torch

from falconet.errors import ConfigError
from falconet.models.falcon_config import FalconConfig

# The config.json files of the released models (falcon form, as the Hub serves them now).
# Numbers: /work/shared/reference/falcon-architecture.md section 3.
RW_1B = {
    "alibi": True, "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 2048,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": False,
    "new_decoder_architecture": False, "num_attention_heads": 32, "num_hidden_layers": 24,
    "parallel_attn": False, "torch_dtype": "bfloat16", "vocab_size": 50304,
}  # fmt: skip
FALCON_7B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
    "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
    "num_kv_heads": 71, "parallel_attn": True, "torch_dtype": "bfloat16", "vocab_size": 65024,
}  # fmt: skip
FALCON_40B = {
    "alibi": False, "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False,
    "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 8192,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
    "new_decoder_architecture": True, "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8,
    "parallel_attn": True, "torch_dtype": "bfloat16", "vocab_size": 65024,
}  # fmt: skip
FALCON_180B = {
    **FALCON_40B,
    "hidden_size": 14848,
    "num_attention_heads": 232,
    "num_hidden_layers": 80,
}
FALCON_11B = {
    "activation": "gelu", "alibi": False, "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0,
    "bias": False, "bos_token_id": 11, "eos_token_id": 11, "ffn_hidden_size": 16384, "hidden_dropout": 0.0,
    "hidden_size": 4096, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 8192,
    "model_type": "falcon", "multi_query": True, "new_decoder_architecture": True, "num_attention_heads": 32,
    "num_hidden_layers": 60, "num_kv_heads": 8, "num_ln_in_parallel_attn": 1, "parallel_attn": True,
    "rope_theta": 500042, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 65024,
}  # fmt: skip

# name: (config, head_dim, kv_heads, qkv_size, block_layout, ffn_size, rope_theta, layers, alibi)
REAL = {
    "falcon-rw-1b": (RW_1B, 64, 32, 6144, "sequential", 8192, 10000.0, 24, True),
    "falcon-7b": (FALCON_7B, 64, 1, 4672, "parallel", 18176, 10000.0, 32, False),
    "falcon-40b": (FALCON_40B, 64, 8, 9216, "parallel_2ln", 32768, 10000.0, 60, False),
    "falcon-180b": (FALCON_180B, 64, 8, 15872, "parallel_2ln", 59392, 10000.0, 80, False),
    "falcon-11b": (FALCON_11B, 128, 8, 6144, "parallel", 16384, 500042.0, 60, False),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_derive_the_published_sizes(name):
    d, head_dim, kv_heads, qkv, layout, ffn, theta, layers, alibi = REAL[name]
    c = FalconConfig.from_hf(d)
    assert (c.head_dim, c.kv_heads, c.qkv_size, c.block_layout, c.ffn_size) == (
        head_dim,
        kv_heads,
        qkv,
        layout,
        ffn,
    )
    assert (c.rope_theta, c.num_hidden_layers, c.alibi, c.rotary) == (
        theta,
        layers,
        alibi,
        not alibi,
    )
    assert c.rope_scaling_type is None and c.rope_scaling_factor == 1.0
    assert c.torch_dtype == "bfloat16"
    assert c.tie_word_embeddings is (name != "falcon-11b")
    # The KV cache stores only the real KV heads: 7B caches 1 head, not 71.
    assert c.kv_cache_bytes_per_token(2) == 2 * layers * kv_heads * head_dim * 2


def test_real_config_details():
    rw = FalconConfig.from_hf(RW_1B)
    assert (rw.bias, rw.bos_token_id, rw.eos_token_ids, rw.vocab_size) == (True, 1, (2,), 50304)
    c7 = FalconConfig.from_hf(FALCON_7B)
    assert c7.num_kv_heads == 71  # as written; only kv_heads (1) is used
    assert c7.extra["apply_residual_connection_post_layernorm"] is False
    c11 = FalconConfig.from_hf(FALCON_11B)
    assert (c11.num_ln_in_parallel_attn, c11.max_position_embeddings) == (1, 8192)
    # A 40B config without num_ln_in_parallel_attn means two norms (transformers sets 2).
    assert (
        FalconConfig.from_hf({**FALCON_40B, "num_ln_in_parallel_attn": 2}).block_layout
        == "parallel_2ln"
    )


# ---- legacy RefinedWeb configs (the custom-code era, before transformers had Falcon) ----

RW_7B_LEGACY = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWebModel",
    "multi_query": True, "n_head": 71, "n_layer": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 65024,
}  # fmt: skip
RW_40B_LEGACY = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 8192, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWeb",
    "n_head": 128, "n_head_kv": 8, "n_layer": 60, "parallel_attn": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 65024,
}  # fmt: skip
RW_1B_LEGACY = {
    "alibi": True, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
    "attention_dropout": 0.0, "bias": True, "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0,
    "hidden_size": 2048, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWebModel",
    "multi_query": False, "n_head": 32, "n_layer": 24, "parallel_attn": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 50304,
}  # fmt: skip


@pytest.mark.parametrize(
    ("legacy", "current"),
    [(RW_7B_LEGACY, FALCON_7B), (RW_40B_LEGACY, FALCON_40B), (RW_1B_LEGACY, RW_1B)],
    ids=["7b", "40b", "rw-1b"],
)
def test_legacy_refinedweb_configs_match_their_converted_form(legacy, current):
    old, new = FalconConfig.from_hf(legacy), FalconConfig.from_hf(current)
    derived = (
        "head_dim",
        "kv_heads",
        "qkv_size",
        "block_layout",
        "ffn_size",
        "rope_theta",
        "num_hidden_layers",
    )
    assert {k: getattr(old, k) for k in derived} == {k: getattr(new, k) for k in derived}
    assert old.new_decoder_architecture is new.new_decoder_architecture


def test_legacy_n_embed_and_n_head_kv():
    c = FalconConfig.from_hf(
        {"model_type": "RefinedWebModel", "n_embed": 256, "n_head": 8, "n_head_kv": 2, "n_layer": 3}
    )
    # n_head_kv present -> the 40B decoder (transformers' converter rule).
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (256, 8, 3)
    assert (c.new_decoder_architecture, c.kv_heads, c.head_dim, c.qkv_size) == (
        True,
        2,
        32,
        (8 + 4) * 32,
    )
    assert c.block_layout == "parallel_2ln"
    # An explicit current-name key wins over the legacy one.
    assert FalconConfig.from_hf({**FALCON_7B, "n_head": 4}).num_attention_heads == 71


# ---- rope scaling in the v4 and v5 forms -----------------------------------------


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_v4_and_v5_forms_agree(kind):
    v4 = {**FALCON_7B, "rope_theta": 20000.0, "rope_scaling": {"type": kind, "factor": 2.0}}
    v5 = {**FALCON_7B, "rope_parameters": {"rope_type": kind, "rope_theta": 20000.0, "factor": 2.0}}
    for d in (v4, v5):
        c = FalconConfig.from_hf(d)
        assert (c.rope_scaling_type, c.rope_scaling_factor, c.rope_theta) == (kind, 2.0, 20000.0)
    default = FalconConfig.from_hf(
        {**FALCON_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert (default.rope_scaling_type, default.rope_theta) == (None, 5e5)
    # v5 keeps theta in rope_parameters; a top-level rope_theta is the fallback.
    c = FalconConfig.from_hf(
        {**FALCON_7B, "rope_theta": 123.0, "rope_parameters": {"rope_type": kind, "factor": 3}}
    )
    assert (c.rope_theta, c.rope_scaling_factor) == (123.0, 3)


# ---- agreement with transformers.FalconConfig --------------------------------------


def hf_qkv_width(hf) -> int:
    """The formula in transformers' FalconAttention.__init__."""
    if hf.new_decoder_architecture:
        return (2 * hf.num_kv_heads + hf.num_attention_heads) * hf.head_dim
    if hf.multi_query:
        return hf.hidden_size + 2 * hf.head_dim
    return 3 * hf.hidden_size


def hf_kv_heads(hf) -> int:
    return hf.num_kv_heads if (hf.new_decoder_architecture or not hf.multi_query) else 1


def assert_agrees_with_transformers(ours: FalconConfig, hf) -> None:
    assert ours.head_dim == hf.head_dim
    assert ours.kv_heads == hf_kv_heads(hf)
    assert ours.ffn_size == hf.ffn_hidden_size
    assert ours.qkv_size == hf_qkv_width(hf)
    assert ours.rotary == hf.rotary


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_agree_with_transformers(name):
    from transformers import FalconConfig as HFConfig
    from transformers import FalconForCausalLM

    d = REAL[name][0]
    ours, hf = FalconConfig.from_hf(d), HFConfig(**d)
    assert_agrees_with_transformers(ours, hf)
    # And against the module transformers really builds (on meta: no memory).
    hf.num_hidden_layers = 1
    with torch.device("meta"):
        model = FalconForCausalLM(hf)
    qkv = model.transformer.h[0].self_attention.query_key_value.weight
    assert tuple(qkv.shape) == (ours.qkv_size, ours.hidden_size)
    assert model.transformer.h[0].mlp.dense_h_to_4h.weight.shape[0] == ours.ffn_size


@pytest.mark.parametrize("name", list(REAL))
def test_to_hf_round_trips(name):
    from transformers import FalconConfig as HFConfig

    ours = FalconConfig.from_hf(REAL[name][0])
    out = ours.to_hf()
    json.dumps(out)  # writable as config.json
    again = FalconConfig.from_hf(out)
    derived = (
        "head_dim",
        "kv_heads",
        "qkv_size",
        "block_layout",
        "ffn_size",
        "rope_theta",
        "variant",
    )
    assert {k: getattr(again, k) for k in derived} == {k: getattr(ours, k) for k in derived}
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "alibi", "bias", "tie_word_embeddings",
                  "eos_token_ids", "bos_token_id", "max_position_embeddings", "torch_dtype"):  # fmt: skip
        assert getattr(again, field) == getattr(ours, field), field
    assert again.to_hf() == out
    assert_agrees_with_transformers(ours, HFConfig(**out))


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_to_hf_keeps_rope_scaling(kind):
    from transformers import FalconConfig as HFConfig

    ours = FalconConfig.from_hf(
        {**FALCON_7B, "rope_scaling": {"type": kind, "factor": 4.0}, "rope_theta": 1e5}
    )
    out = ours.to_hf()
    assert out["rope_parameters"] == {"rope_type": kind, "rope_theta": 1e5, "factor": 4.0}
    again = FalconConfig.from_hf(out)
    assert (again.rope_scaling_type, again.rope_scaling_factor, again.rope_theta) == (
        kind,
        4.0,
        1e5,
    )
    hf = HFConfig(**out)
    assert hf.rope_parameters["rope_type"] == kind and hf.rope_parameters["factor"] == 4.0


def test_tiny_variant_configs_written_by_transformers():
    from tests.conftest import VARIANTS, hf_config

    for variant in VARIANTS:
        hf = hf_config(variant)
        ours = FalconConfig.from_hf(hf.to_dict())
        assert_agrees_with_transformers(ours, hf)


# ---- bad configs -----------------------------------------------------------------

BAD = {
    "hidden_not_divisible": ({"hidden_size": 4545}, "hidden_size"),
    "heads_not_multiple_of_kv": ({**FALCON_40B, "num_kv_heads": 7}, "num_kv_heads"),
    "kv_heads_zero": ({**FALCON_40B, "num_kv_heads": 0}, "num_kv_heads"),
    "kv_heads_string": ({**FALCON_40B, "num_kv_heads": "8"}, "num_kv_heads"),
    "mha_kv_heads_mismatch": ({**RW_1B, "num_kv_heads": 8}, "num_kv_heads"),
    "unknown_activation": ({"activation": "swiglu"}, "activation"),
    "rope_unknown_type": ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
    "rope_factor_below_one": (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 0.5}},
        "factor",
    ),
    "rope_factor_string": ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "factor"),
    "rope_factor_inf": (
        {"rope_parameters": {"rope_type": "linear", "factor": float("inf")}},
        "factor",
    ),
    "rope_with_alibi": (
        {**RW_1B, "rope_scaling": {"type": "linear", "factor": 2.0}},
        "rope_scaling",
    ),
    "rope_scaling_not_object": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope_parameters_not_object": ({"rope_parameters": 2.0}, "rope_parameters"),
    "rope_theta_negative": ({"rope_theta": -1.0}, "rope_theta"),
    "rope_theta_bool": ({"rope_theta": True}, "rope_theta"),
    "negative_hidden": ({"hidden_size": -4544}, "hidden_size"),
    "zero_layers": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "negative_vocab": ({"vocab_size": -1}, "vocab_size"),
    "negative_ffn": ({"ffn_hidden_size": -16}, "ffn_hidden_size"),
    "string_heads": ({"num_attention_heads": "71"}, "num_attention_heads"),
    "string_hidden": ({"hidden_size": "4544"}, "hidden_size"),
    "string_ffn": ({"ffn_hidden_size": "18176"}, "ffn_hidden_size"),
    "float_layers": ({"num_hidden_layers": 32.0}, "num_hidden_layers"),
    "bool_as_int": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "string_epsilon": ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
    "zero_epsilon": ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
    "string_true_multi_query": ({"multi_query": "true"}, "multi_query"),
    "string_false_alibi": ({"alibi": "false"}, "alibi"),
    "int_parallel_attn": ({"parallel_attn": 1}, "parallel_attn"),
    "string_tie": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    "num_ln_3": ({**FALCON_40B, "num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn"),
    "num_ln_3_old_arch": ({"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn"),
    "num_ln_string": ({**FALCON_40B, "num_ln_in_parallel_attn": "1"}, "num_ln_in_parallel_attn"),
    "num_ln_2_old_arch": ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    "bos_string": ({"bos_token_id": "11"}, "bos_token_id"),
    "pad_negative": ({"pad_token_id": -1}, "pad_token_id"),
    "eos_list_of_strings": ({"eos_token_id": ["<|endoftext|>"]}, "eos_token_id"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_names_the_field(case):
    over, field = BAD[case]
    d = (
        over if "model_type" in over else {**FALCON_7B, **over}
    )  # a whole config, or 7B with changes
    with pytest.raises(ConfigError, match=field):
        FalconConfig.from_hf(d)


@pytest.mark.parametrize(
    ("value", "words"),
    [([FALCON_7B], "list"), ("falcon", "str"), (None, "NoneType"), (7, "int")],
)
def test_non_object_config_json(value, words):
    with pytest.raises(ConfigError, match=f"expected a JSON object, got {words}"):
        FalconConfig.from_hf(value)


@pytest.mark.parametrize("model_type", ["llama", None, "Falcon", "falcon_mamba"])
def test_non_falcon_model_type(model_type):
    d = {**FALCON_7B, "model_type": model_type}
    if model_type is None:
        del d["model_type"]
    with pytest.raises(ConfigError, match=r"model_type .* is not a Falcon model"):
        FalconConfig.from_hf(d)


def test_from_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none" / "config.json"
    with pytest.raises(ConfigError, match=r"none/config.json: no config.json"):
        FalconConfig.from_file(missing)
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "falcon",')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        FalconConfig.from_file(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        FalconConfig.from_file(bad)
    bad.write_text(json.dumps({**FALCON_7B, "hidden_size": 100}))
    with pytest.raises(ConfigError, match=r"config.json: config: hidden_size 100 is not divisible"):
        FalconConfig.from_file(bad)
    folder = tmp_path / "dir"
    (folder / "config.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config.json: cannot be read"):
        FalconConfig.from_file(folder / "config.json")
    bad.write_text(json.dumps(FALCON_11B))
    assert FalconConfig.from_file(bad).qkv_size == 6144


def test_rope_scaling_factor_one_is_accepted_as_transformers_does():
    cfg = FalconConfig.from_hf({**FALCON_7B, "rope_scaling": {"type": "linear", "factor": 1.0}})
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == ("linear", 1.0)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"hidden_size": 4545, "num_attention_heads": 45}, "must be even"),  # head size 101
        (
            {
                "hidden_size": 142,
                "num_attention_heads": 71,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
            },
            "head size > 2",
        ),
    ],
)
def test_rotary_head_size_checks(over, needle):
    with pytest.raises(ConfigError, match=needle):
        FalconConfig.from_hf({**FALCON_7B, **over})


def test_n_embed_overrides_hidden_size_as_in_transformers():
    cfg = FalconConfig.from_hf(
        {**RW_7B_LEGACY, "n_embed": 568}
    )  # RW_7B_LEGACY says hidden_size 4544
    assert (cfg.hidden_size, cfg.head_dim) == (568, 8)


def test_config_and_model_know_the_same_activations():
    from falconet.models import falcon, falcon_config

    assert set(falcon_config.ACTIVATIONS) == set(falcon.ACTIVATIONS)
