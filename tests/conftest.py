"""Shared fixtures: tiny real Falcon and Llama (Falcon3) checkpoints written by
transformers, and a tiny byte-level BPE tokenizer trained in the test session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Falcon models run on your own machine. "
    "In the beginning was the word, and the word was with the model. 東京は日本の首都です。 "
    "Emoji test: 🦅 👩‍👩‍👧 ✓ — naïve café. Numbers 1234567890 and code: def f(x): return x * 2\n"
) * 20

SPECIAL_TOKENS = [">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
                  ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<",
                  ">>MIDDLE<<", "<|endoftext|>"]  # fmt: skip
EOS_ID = 11  # <|endoftext|>, as in Falcon's tokenizer


def write_tokenizer(folder: Path, vocab_size: int = 400) -> None:
    """Byte-level BPE like Falcon's (special tokens first, <|endoftext|> = 11)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.token_to_id("<|endoftext|>") == EOS_ID
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )


# Tiny configs, one per Falcon variant (HF FalconConfig kwargs).
VARIANTS: dict[str, dict] = {
    "rw": dict(alibi=True, multi_query=False, parallel_attn=False, bias=True, new_decoder_architecture=False,
               num_attention_heads=4),
    "rw_6heads": dict(alibi=True, multi_query=False, parallel_attn=False, bias=True,
                      new_decoder_architecture=False, num_attention_heads=6, hidden_size=48),
    # 7B configs written by transformers say num_kv_heads = num_attention_heads, but use 1.
    "7b": dict(multi_query=True, parallel_attn=True, num_kv_heads=4, num_attention_heads=4),
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8),
    "11b": dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=4,
                num_ln_in_parallel_attn=1, rope_parameters={"rope_type": "default", "rope_theta": 500042.0},
                tie_word_embeddings=False),
    "7b_rope_linear": dict(multi_query=True, max_position_embeddings=16,
                           rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "7b_rope_dynamic": dict(multi_query=True, max_position_embeddings=16,
                            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "mha_rotary_bias": dict(multi_query=False, parallel_attn=True, bias=True, num_attention_heads=4,
                            ffn_hidden_size=96, activation="gelu"),
}  # fmt: skip


def hf_config(variant: str, **over):
    from transformers import FalconConfig as HFConfig

    kw = dict(vocab_size=448, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2,
              max_position_embeddings=2048, bos_token_id=EOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    kw.update(VARIANTS[variant])
    kw.update(over)
    return HFConfig(**kw)


def build_hf_model(variant: str, seed: int = 0, **over):
    from transformers import FalconForCausalLM

    torch.manual_seed(seed)
    model = FalconForCausalLM(hf_config(variant, **over)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring shows
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


# ---- Llama / Falcon3 ----------------------------------------------------------------


def rope(kind: str, **extra) -> dict:
    return {"rope_type": kind, "rope_theta": 10000.0, **extra}


# Tiny configs (HF LlamaConfig kwargs). heads / kv heads: the GQA ratio; head_dim set apart
# from hidden / heads where given. The rope variants keep 16 positions so prompts and
# generations run past max_position_embeddings (dynamic rescales there).
LLAMA_VARIANTS: dict[str, dict] = {
    "mha_3heads": dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=48),
    "gqa2_head_dim": dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, head_dim=20),
    "gqa3_tied": dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=96, head_dim=24,
                      tie_word_embeddings=True),
    "falcon3_shape": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96, head_dim=32,
                          rms_norm_eps=1e-6, rope_parameters=rope("default", rope_theta=1000042.0)),
    "biases": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, attention_bias=True,
                   mlp_bias=True),
    "rope_linear": dict(max_position_embeddings=16, rope_parameters=rope("linear", factor=2.0)),
    "rope_dynamic": dict(max_position_embeddings=16, rope_parameters=rope("dynamic", factor=2.0)),
    "rope_llama3": dict(max_position_embeddings=64, rope_parameters=rope(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
}  # fmt: skip


def llama_hf_config(variant: str, **over):
    from transformers import LlamaConfig as HFConfig

    kw = dict(vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=EOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    kw.update(LLAMA_VARIANTS[variant])
    kw.update(over)
    return HFConfig(**kw)


def build_llama_hf_model(variant: str, seed: int = 0, **over):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_hf_config(variant, **over)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


# Tiny Falcon-Mamba configs (HF FalconMambaConfig kwargs over the base below).
FALCON_MAMBA_VARIANTS: dict[str, dict] = {
    "conv4_tied": dict(conv_kernel=4),
    "conv3_bias_untied": dict(conv_kernel=3, time_step_rank=7, use_bias=True,
                              tie_word_embeddings=False),
}  # fmt: skip


def build_falcon_mamba_hf_model(variant: str, seed: int = 0, **over):
    """A tiny FalconMambaForCausalLM (vocabulary 448: room for the test tokenizer)."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    kw = dict(vocab_size=448, hidden_size=48, state_size=5, num_hidden_layers=3, expand=2,
              pad_token_id=0, bos_token_id=EOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    kw.update(FALCON_MAMBA_VARIANTS[variant])
    kw.update(over)
    torch.manual_seed(seed)
    model = FalconMambaForCausalLM(FalconMambaConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias") and "dt_proj" not in name:
                p.normal_(0, 0.1)
            elif name.endswith("out_proj.weight"):
                p.mul_(10)  # else a tied head mostly repeats the last token
    return model


# Falcon-H1 (tests/test_falcon_h1.py): two Mamba groups, mamba_d_head 6, every muP
# multiplier away from 1, a chunk size that divides no prompt, GQA 4/2.
FALCON_H1_BASE = dict(
    vocab_size=448,  # room for the test tokenizer
    pad_token_id=0,
    bos_token_id=EOS_ID,
    eos_token_id=EOS_ID,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    max_position_embeddings=256,
    rope_theta=1e11,  # Falcon-H1's base
    mamba_d_ssm=24,
    mamba_n_heads=4,
    mamba_d_head=6,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_chunk_size=5,  # divides neither the 23-token prompt nor the prefill pieces
    embedding_multiplier=1.3,
    lm_head_multiplier=0.7,
    key_multiplier=1.2,
    attention_in_multiplier=0.9,
    attention_out_multiplier=1.1,
    ssm_in_multiplier=0.8,
    ssm_out_multiplier=1.25,
    ssm_multipliers=[0.5, 1.5, 0.75, 1.3, 0.6],
    mlp_multipliers=[1.4, 0.6],
)
FALCON_H1_VARIANTS: dict[str, dict] = {
    "gate_then_norm": dict(
        mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_proj_bias=True, projectors_bias=True
    ),
    "norm_then_gate": dict(
        mamba_rms_norm=True, mamba_norm_before_gate=True, attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e11},
    ),
    "no_norm_tied": dict(mamba_rms_norm=False, tie_word_embeddings=True, mlp_bias=True),
    # d_ssm from mamba_expand, d_head "auto", one group, MHA, conv without bias, and
    # time_step_limit low enough to clamp
    "auto_sizes_clamped": dict(
        mamba_d_ssm=None, mamba_expand=2, mamba_d_head="auto", mamba_n_heads=8, mamba_n_groups=1,
        num_key_value_heads=4, mamba_conv_bias=False, time_step_limit=[0.05, 0.6],
    ),
}  # fmt: skip


def build_falcon_h1_hf_model(variant: str, changes: dict | None = None):
    """A tiny random FalconH1ForCausalLM: FALCON_H1_BASE with FALCON_H1_VARIANTS[variant]
    (or `changes`) over it."""
    import transformers

    torch.manual_seed(sum(map(ord, variant)))
    changes = FALCON_H1_VARIANTS[variant] if changes is None else changes
    model = transformers.FalconH1ForCausalLM(
        transformers.FalconH1Config(**{**FALCON_H1_BASE, **changes})
    ).eval()
    # transformers' init (std 0.02, A_log = log(1..H), D = 1) gives near-constant logits;
    # weights of unit gain make every multiplier and path visible in them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 0.4)
            elif p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of `prompt` (EOS ignored): the reference."""
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def memorize(model, ids: list[int], steps: int = 30):
    """`model` (an HF causal LM) trained to continue `ids`, so its greedy tokens have
    margins of several logits: comparable across engines that round differently."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_hf_model(model, folder: Path, **save_kw) -> Path:
    model.save_pretrained(folder, **save_kw)
    write_tokenizer(folder)
    return folder


# Tiny HF model builders and their variants by architecture name (falconet/models/registry.py
# ARCHITECTURES), for tests that must cover every registered architecture.
TINY_HF_MODELS: dict[str, tuple[Callable[..., Any], dict[str, dict]]] = {
    "falcon": (build_hf_model, VARIANTS),
    "llama": (build_llama_hf_model, LLAMA_VARIANTS),
    "falcon_mamba": (build_falcon_mamba_hf_model, FALCON_MAMBA_VARIANTS),
    "falcon_h1": (build_falcon_h1_hf_model, FALCON_H1_VARIANTS),
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """Every variant as (HF model, folder written by save_pretrained)."""
    out = {}
    for variant in VARIANTS:
        model = build_hf_model(variant)
        out[variant] = (model, save_hf_model(model, tmp_path_factory.mktemp(variant)))
    return out


@pytest.fixture(scope="session")
def tiny_7b(hf_checkpoints) -> Path:
    return hf_checkpoints["7b"][1]


def assert_matches_transformers(folder: Path, text: str) -> None:
    """falconet and transformers on one HF folder: the same token ids for `text`, and
    fp32 logits within 1e-4."""
    from transformers import FalconForCausalLM, PreTrainedTokenizerFast

    import falconet

    llm = falconet.load(folder, dtype="float32")
    hf = FalconForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(text)
    assert ids == PreTrainedTokenizerFast.from_pretrained(folder)(text)["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-4


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script_module(name: str):
    """scripts/NAME.py imported as a module (the scripts are files, not a package)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


def assert_cli_error(res, needle: str) -> None:
    """A user error from the CLI: exit 2, nothing on stdout, one `falconet: error:` line."""
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("falconet: error: ") and needle in lines[0]
    assert res.stdout == ""


@pytest.fixture(scope="module")
def ours(hf_dir, tmp_path_factory):
    """(variant, type) -> the GGUF falconet's writer makes of hf_dir(variant); each GGUF
    test module defines its own `hf_dir` (variant -> tiny HF folder), which this uses."""
    from falconet.convert import convert_hf_to_gguf

    out = tmp_path_factory.mktemp("ours")
    cache: dict[tuple[str, str], Path] = {}

    def get(variant: str, qtype: str) -> Path:
        if (variant, qtype) not in cache:
            path = out / f"{variant}-{qtype}.gguf"
            convert_hf_to_gguf(hf_dir(variant), path, qtype)
            cache[variant, qtype] = path
        return cache[variant, qtype]

    return get


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL server with pgvector, started once for the session (or
    FALCONET_TEST_PG_URL): its URL. Each test takes a schema of its own (pg_tools.new_schema)."""
    import os

    from tests.pg_tools import ENV_URL, PostgresServer

    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.stop()


def on_both_simd_paths(native, compute: Callable[[], Any]) -> tuple[Any, Any]:
    """`compute()` on the compiled kernels' AVX2 path, then on the portable one (skips
    without AVX2); the kernels are written so the two give the same bits."""
    try:
        native.set_simd("avx2")
    except ValueError:
        pytest.skip("no AVX2 on this CPU")
    fast = compute()
    native.set_simd("portable")
    try:
        return fast, compute()
    finally:
        native.set_simd("avx2")
