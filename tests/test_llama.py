"""Llama / Falcon3: parity with transformers.LlamaForCausalLM on tiny random checkpoints
(GQA ratios 1-3, head_dim apart from hidden/heads, tied and untied heads, every rope
scaling type), internal consistency (cache, batching through the engine), loading
(sharded, bf16, quantized at load) and LlamaConfig's reading and checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.errors import CheckpointError, ConfigError
from falconet.models.checkpoint import expected_tensors
from falconet.models.llama import Llama
from falconet.models.llama_config import LlamaConfig
from falconet.models.registry import config_from_hf, for_config
from falconet.nn.cache import KVCache
from falconet.quant import get_format
from falconet.quant.linear import QuantEmbedding, QuantLinear
from falconet.sampling import SamplingParams
from tests.conftest import (
    LLAMA_VARIANTS,
    build_llama_hf_model,
    hf_greedy,
    llama_hf_config,
    rope,
    save_hf_model,
)
from tests.test_engine import _drain, _ids, _tokens_and_logprobs, batch_and_alone

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 300, 12, 64, 128, 1, 400, 33, 21, 8, 77, 150, 200]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    return {
        v: (m := build_llama_hf_model(v), save_hf_model(m, tmp_path_factory.mktemp(v)))
        for v in LLAMA_VARIANTS
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- parity with transformers ---------------------------------------------------------


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    hf_model, folder = checkpoints[variant]
    llm = falconet.load(folder, dtype="float32")
    assert isinstance(llm.model, Llama)
    prompt = PROMPT + PROMPT  # 40 tokens: past max_position_embeddings for the rope variants
    ours = llm.logits(prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0]
    assert ours.shape == ref.shape == (len(prompt), 448)
    assert max_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_greedy_tokens_match_transformers_generate(checkpoints, variant):
    hf_model, folder = checkpoints[variant]
    llm = falconet.load(folder, dtype="float32")
    prompt = PROMPT[:8]
    out = llm.complete([prompt], max_tokens=32, ignore_eos=True)[0]
    assert out.token_ids == hf_greedy(hf_model, prompt, 32)
    assert out.finish_reason == "length"


def test_module_names_are_transformers_names(checkpoints):
    hf_model, folder = checkpoints["falcon3_shape"]
    llm = falconet.load(folder, dtype="float32")
    ours = dict(llm.model.named_parameters())
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


# Not dynamic RoPE: its frequencies change as the sequence grows, so cached keys were
# rotated with older ones (in transformers too); the greedy test covers it against HF.
@pytest.mark.parametrize("variant", [v for v in LLAMA_VARIANTS if v != "rope_dynamic"])
def test_cached_decoding_equals_full_forward(checkpoints, variant):
    llm = falconet.load(checkpoints[variant][1], dtype="float32")
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        full = llm.model(ids)[0]
        cache = KVCache(llm.config, 1, len(PROMPT))
        steps = [llm.model(ids[:, :5], cache)[0]]  # a 5-token prefill, then one at a time
        steps += [llm.model(ids[:, t : t + 1], cache)[0] for t in range(5, len(PROMPT))]
    # fp32 summation order only: decode runs the row kernel, the full forward a GEMM
    assert max_diff(torch.cat(steps), full) <= 1e-5 * full.abs().max().item()


@pytest.mark.parametrize("variant", ["mha_3heads", "gqa2_head_dim", "gqa3_tied"])
def test_kv_cache_stores_real_kv_heads_at_head_dim(checkpoints, variant):
    llm = falconet.load(checkpoints[variant][1], dtype="float32")
    cache = KVCache(llm.config, 1, 8)
    hf = checkpoints[variant][0].config
    assert cache.k.shape[2:] == (hf.num_key_value_heads, 8, hf.head_dim)  # (L, B, K, S, D)
    assert (
        llm.config.kv_cache_bytes_per_token(4) == 2 * 2 * hf.num_key_value_heads * hf.head_dim * 4
    )


# ---- the engine: paged attention, batch invariance ---------------------------------------


@pytest.mark.parametrize("variant", ["gqa2_head_dim", "rope_dynamic", "rope_llama3"])
def test_packed_paged_forward_matches_dense(checkpoints, variant):
    """Chunked prefill and decode through the paged cache give the dense path's tokens and
    log-probs (the dense path is checked against transformers above)."""
    llm = falconet.load(checkpoints[variant][1], dtype="float32")
    prompt = _ids(29, 448, seed=1)
    greedy = SamplingParams(max_tokens=6, logprobs=20, ignore_eos=True)
    engine = Engine.from_llm(llm, max_context=64, prefill_chunk=8, prefill_budget=8, block_size=4)
    [stream] = engine.submit([prompt], [greedy])
    ids, lps, tops = _tokens_and_logprobs(_drain(engine, [stream])[0])
    [ref] = llm.complete([prompt], greedy)
    assert ids == ref.token_ids and len(ids) == 6
    assert max_diff(torch.tensor(lps), torch.tensor([lp.logprob for lp in ref.logprobs])) <= 1e-4
    assert [[t for t, _ in top] for top in tops] == [[t for t, _ in lp.top] for lp in ref.logprobs]


@pytest.mark.parametrize("variant, dtype", [("falcon3_shape", "float32"), ("gqa3_tied", "float32"),
                                            ("rope_llama3", "float32"), ("falcon3_shape", "bfloat16")])  # fmt: skip
def test_engine_batch_equals_alone_bit_for_bit(checkpoints, variant, dtype):
    """Each sequence's tokens and log-probs are bit for bit those it gets alone, with
    neighbours of other lengths joining mid-way (prefill chunks and decodes share steps)."""
    llm = falconet.load(checkpoints[variant][1], dtype=dtype)
    together, alone = batch_and_alone(llm, 448)
    assert together == alone


# ---- loading ----------------------------------------------------------------------------


def test_expected_tensors_match_transformers_state_dict():
    for variant in LLAMA_VARIANTS:
        hf = build_llama_hf_model(variant)
        theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            del theirs["lm_head.weight"]
        assert expected_tensors(config_from_hf(hf.config.to_dict())) == theirs, variant


def test_sharded_safetensors(tmp_path):
    hf_model = build_llama_hf_model("falcon3_shape")
    folder = save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    llm = falconet.load(folder, dtype="float32")
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert max_diff(llm.logits(PROMPT), ref) <= 1e-4


def test_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint loads as bf16 weights (dtype auto) straight from the file, and
    stays close to transformers running the same weights in bf16 and fp32."""
    from transformers import LlamaForCausalLM

    folder = save_hf_model(
        build_llama_hf_model("falcon3_shape").to(torch.bfloat16), tmp_path / "bf16"
    )
    llm = falconet.load(folder)
    assert llm.config.torch_dtype == "bfloat16"
    params = dict(llm.model.named_parameters())
    assert params["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert llm.model.compute_dtype == torch.float32
    hf32 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf16 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert torch.equal(params["model.layers.1.mlp.down_proj.weight"],
                       hf16.model.layers[1].mlp.down_proj.weight)  # fmt: skip
    ours = llm.logits(PROMPT)
    with torch.no_grad():
        ref32 = hf32(torch.tensor([PROMPT])).logits[0]
        ref16 = hf16(torch.tensor([PROMPT])).logits[0].float()
    scale = ref32.abs().max().item()
    # ours rounds matmul inputs and outputs to bf16 (linear.py): between the two references
    assert max_diff(ours, ref32) <= 0.02 * scale
    assert max_diff(ours, ref16) <= 0.05 * scale
    assert torch.equal(ours.argmax(-1), ref32.argmax(-1))


@pytest.fixture(scope="module")
def gentle(tmp_path_factory) -> tuple[object, Path]:
    """Falcon3's shape with weights of std 0.05: the std 0.2 models above amplify any
    rounding through their layers (Q8_0 weights alone move their logits by 7 %)."""
    hf_model = build_llama_hf_model("falcon3_shape", initializer_range=0.05)
    return hf_model, save_hf_model(hf_model, tmp_path_factory.mktemp("gentle"))


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_at_load(gentle, quant):
    """Every matrix quantized while the checkpoint streams in, byte-equal to quantizing
    the HF tensor; the untied head is Q8_0 (llama.cpp's rule for a head whose rows are
    no whole K-quant super-blocks)."""
    hf_model, folder = gentle
    llm = falconet.load(folder, quant=quant)
    hf_state = hf_model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                 "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):  # fmt: skip
        layer = llm.model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.qtype == quant
        want = get_format(quant).quantize(hf_state[f"{name}.weight"].numpy())
        assert np.array_equal(layer.weight.data.numpy(), want)
    emb = llm.model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.fmt.name == quant
    assert isinstance(llm.model.lm_head, QuantLinear) and llm.model.lm_head.qtype == "q8_0"
    assert llm.model.num_parameters() == sum(p.numel() for p in hf_model.parameters())
    # transformers running the weights the blocks hold: what is left is falconet rounding
    # activations to 8 bits per block for the integer kernels, as llama.cpp does
    rounded = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2:
                kind = get_format("q8_0" if name == "lm_head.weight" else quant)
                p.copy_(torch.from_numpy(kind.dequantize(kind.quantize(p.numpy()), p.shape)))
        ref = rounded(torch.tensor([PROMPT])).logits[0]
    assert max_diff(llm.logits(PROMPT), ref) <= 0.03 * ref.abs().max().item()


def test_quantized_tied_head_shares_the_embedding_blocks(checkpoints):
    llm = falconet.load(checkpoints["gqa3_tied"][1], quant="q4_0")
    emb, head = llm.model.model.embed_tokens, llm.model.lm_head
    assert emb.fmt.name == head.fmt.name == "q8_0"  # the tied embedding is the head
    assert emb.weight_blocks.data_ptr() == head.weight_blocks.data_ptr()
    assert (
        llm.model.weight_bytes() < falconet.load(checkpoints["gqa3_tied"][1]).model.weight_bytes()
    )


def test_checkpoint_of_another_shape_is_refused(checkpoints, tmp_path):
    folder = save_hf_model(build_llama_hf_model("falcon3_shape"), tmp_path / "f3")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "head_dim": 16}))
    with pytest.raises(
        CheckpointError,
        match=r"k_proj.weight has shape \(64, 96\), expected \(32, 96\) from config.json",
    ):
        falconet.load(folder)
    tied = save_hf_model(build_llama_hf_model("gqa3_tied"), tmp_path / "tied")
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(
        CheckpointError, match=r"has no tensor lm_head.weight; is this a complete llama"
    ):
        falconet.load(tied)


# ---- LlamaConfig ------------------------------------------------------------------------

FALCON3_7B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 11, "eos_token_id": 11, "head_dim": 256, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 23040, "max_position_embeddings": 32768,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000042, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 131072,
}  # fmt: skip


def test_falcon3_config():
    c = config_from_hf(FALCON3_7B)
    assert isinstance(c, LlamaConfig) and for_config(c).model is Llama
    assert (c.head_dim, c.kv_heads, c.num_attention_heads, c.num_hidden_layers) == (256, 4, 12, 28)
    assert (c.rope_theta, c.rope_scaling_type, c.rms_norm_eps) == (1000042, None, 1e-6)
    assert (c.eos_token_ids, c.torch_dtype, c.alibi, c.tie_word_embeddings) == (
        (11,),
        "bfloat16",
        False,
        False,
    )
    # 2 (K and V) x 28 layers x 4 kv heads x 256 x 2 bytes: 112 KiB a token in bf16
    assert c.kv_cache_bytes_per_token(2) == 114688
    assert c.extra["pretraining_tp"] == 1 and "GQA 12q/4kv" in c.variant


def test_config_agrees_with_transformers_and_round_trips():
    from transformers import LlamaConfig as HFConfig

    for variant in LLAMA_VARIANTS:
        hf = llama_hf_config(variant)
        c = LlamaConfig.from_hf(hf.to_dict())
        assert (c.head_dim, c.kv_heads) == (hf.head_dim, hf.num_key_value_heads)
        assert c.rope_theta == hf.rope_parameters["rope_theta"]
        again = HFConfig(**c.to_hf())
        assert again.rope_parameters == hf.rope_parameters, variant
        assert LlamaConfig.from_hf(again.to_dict()) == c


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3"])
def test_rope_scaling_v4_and_v5_forms_agree(kind):
    extra = {
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    scaling = {"factor": 8.0, **(extra if kind == "llama3" else {})}
    v4 = LlamaConfig.from_hf({**FALCON3_7B, "rope_scaling": {"type": kind, **scaling}})
    v4b = LlamaConfig.from_hf({**FALCON3_7B, "rope_scaling": {"rope_type": kind, **scaling}})
    v5 = LlamaConfig.from_hf(
        {**FALCON3_7B, "rope_parameters": {"rope_type": kind, "rope_theta": 1000042, **scaling}}
    )
    assert v4 == v4b == v5
    assert (v5.rope_scaling_type, v5.rope_scaling_factor, v5.rope_theta) == (kind, 8.0, 1000042)
    if kind == "llama3":
        assert v5.rope_original_max_position_embeddings == 8192
        no_original = {**scaling, "original_max_position_embeddings": None}
        c = LlamaConfig.from_hf({**FALCON3_7B, "rope_scaling": {"rope_type": kind, **no_original}})
        assert c.rope_original_max_position_embeddings == 32768  # transformers' fallback


@pytest.mark.parametrize("original", [16, 8192])
def test_llama3_frequencies_are_transformers(original):
    """Bit for bit, in each band: kept (short wavelengths), divided by the factor (long),
    interpolated (between); the same for any sequence length."""
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from falconet.nn.attention import rotary_inv_freq

    scaling = rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=original)  # fmt: skip
    hf = llama_hf_config(
        "rope_llama3", hidden_size=256, num_attention_heads=2, rope_parameters=scaling
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](HFConfig(**hf.to_dict()), "cpu")
    ours = rotary_inv_freq(LlamaConfig.from_hf(hf.to_dict()), torch.tensor([1, 50000]))
    assert torch.equal(ours[0], ref) and torch.equal(ours[1], ref)
    plain = rotary_inv_freq(
        LlamaConfig.from_hf({**hf.to_dict(), "rope_parameters": None}), torch.tensor([1])
    )[0]
    wavelen = 2 * torch.pi / plain
    kept, divided = wavelen < original / 4, wavelen > original
    assert kept.any() == (original == 8192) and divided.any() and (~kept & ~divided).any()
    assert torch.equal(ref[kept], plain[kept]) and torch.equal(ref[divided], plain[divided] / 8)


BAD = [
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"intermediate_size": 9.5}, "intermediate_size must be a positive integer"),
    ({"num_key_value_heads": 5}, "num_attention_heads 12 is not a multiple of num_key_value_heads 5"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"head_dim": None, "hidden_size": 3001}, "hidden_size 3001 is not divisible by num_attention_heads 12; set head_dim"),
    ({"head_dim": 255}, "head_dim must be a positive even integer"),
    ({"hidden_act": "swish2"}, "hidden_act 'swish2' is not supported"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": True}, "rope_theta must be a positive number"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": [11, -2]}, "eos_token_id must be a token id or a list of them"),
    ({"bos_token_id": "<s>"}, "bos_token_id must be a token id"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor must be a number >= 1, got 0.5"),
    ({"rope_scaling": {"type": "dynamic"}}, "factor must be a number >= 1, got None"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     "llama3 rope_scaling needs low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     "high_freq_factor > low_freq_factor"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized .*'gptq'.* bfloat16 revision"),
    ({"quantization_config": {"quant_method": "bitnet", "quantization_mode": "qat"}},
     "quantization_mode 'qat' is not one of offline, online"),
    ({"quantization_config": {"quant_method": "bitnet"}, "head_dim": 6, "num_attention_heads": 3,
      "num_key_value_heads": 1}, "ternary .* multiples of 4 .* q_proj has 18"),
]  # fmt: skip


@pytest.mark.parametrize("over, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_config_is_a_config_error(over, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**FALCON3_7B, **over})


def test_bad_config_file_names_the_file(checkpoints, tmp_path):
    folder = save_hf_model(build_llama_hf_model("gqa3_tied"), tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    with pytest.raises(ConfigError, match=r"bad/config.json: config: num_attention_heads 3 is not"):
        falconet.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"model_type 'mistral' is not a Falcon model .*llama"):
        falconet.load(folder)
    # no model_type: the architectures list names the class
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "model_type"})
    )
    assert isinstance(falconet.load(folder).model, Llama)


def test_rope_freq_factors_are_checked():
    """A GGUF's rope_freqs become rope_freq_factors: one positive number per frequency."""
    base = dict(hidden_size=64, num_attention_heads=4, head_dim=8)
    assert LlamaConfig(**base, rope_freq_factors=(1.0, 2.0, 4.0, 8.0)).rope_freq_factors
    for bad in ((1.0, 2.0), (1.0, 2.0, 0.0, 8.0), [1.0, 2.0, 4.0, 8.0]):
        with pytest.raises(ConfigError, match="rope_freq_factors must be 4 positive numbers"):
            LlamaConfig(**base, rope_freq_factors=bad)
