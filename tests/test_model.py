"""Numerical parity with transformers.FalconForCausalLM on tiny random checkpoints of
every variant, and internal consistency (cache, chunking, batching, long context)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import falconet
from falconet.models.dense import prefill
from falconet.nn.cache import KVCache
from tests.conftest import VARIANTS, build_hf_model, hf_greedy, save_hf_model

PROMPT = [
    5,
    17,
    42,
    99,
    3,
    250,
    7,
    7,
    300,
    12,
    64,
    128,
    1,
    400,
    33,
    21,
    8,
    77,
    150,
    200,
]  # 20 tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_checkpoints, variant):
    hf_model, folder = hf_checkpoints[variant]
    llm = falconet.load(folder, dtype="float32")
    ours = llm.logits(PROMPT)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert ours.shape == ref.shape == (len(PROMPT), hf_model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers_generate(hf_checkpoints, variant):
    hf_model, folder = hf_checkpoints[variant]
    llm = falconet.load(folder, dtype="float32")
    prompt = PROMPT[:8]
    ref_new = hf_greedy(hf_model, prompt, 32)
    out = llm.complete([prompt], max_tokens=32, ignore_eos=True)[0]
    assert out.token_ids == ref_new
    assert out.finish_reason == "length"


# Not dynamic RoPE: its frequencies change as the sequence grows, so cached keys were
# rotated with older ones (in transformers too); test_greedy_tokens covers it against HF.
@pytest.mark.parametrize(
    "variant", ["rw", "rw_6heads", "7b", "40b", "11b", "7b_rope_linear", "mha_rotary_bias"]
)
def test_cached_decoding_equals_full_forward(hf_checkpoints, variant):
    llm = falconet.load(hf_checkpoints[variant][1], dtype="float32")
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        full = llm.model(ids)[0]
        cache = KVCache(llm.config, 1, len(PROMPT))
        steps = [llm.model(ids[:, :5], cache)[0]]  # a 5-token prefill, then one at a time
        for t in range(5, len(PROMPT)):
            steps.append(llm.model(ids[:, t : t + 1], cache)[0])
    inc = torch.cat(steps)
    assert (inc - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
def test_kv_cache_stores_real_kv_heads(hf_checkpoints, variant):
    llm = falconet.load(hf_checkpoints[variant][1], dtype="float32")
    cache = KVCache(llm.config, 1, 8)
    expected = {"rw": 4, "7b": 1, "40b": 2}[variant]
    assert cache.k.shape[2] == expected == llm.config.kv_heads


@pytest.mark.parametrize(
    "variant, dtype",
    [("rw", "float32"), ("7b", "float32"), ("40b", "float32"), ("7b_rope_dynamic", "float32"),
     ("7b", "bfloat16"), ("rw", "bfloat16")],
)  # fmt: skip
def test_batch_of_three_equals_each_alone(hf_checkpoints, variant, dtype):
    llm = falconet.load(hf_checkpoints[variant][1], dtype=dtype)
    prompts = [PROMPT[:3], PROMPT[:11], PROMPT[4:20]]
    batched = llm.complete(prompts, max_tokens=12, ignore_eos=True)
    for p, b in zip(prompts, batched, strict=True):
        alone = llm.complete([p], max_tokens=12, ignore_eos=True)[0]
        assert b.token_ids == alone.token_ids
    # and the padded rows' logits equal the unpadded ones
    with torch.inference_mode():
        from falconet.models.dense import left_pad

        ids, valid = left_pad(prompts, torch.device("cpu"))
        cache = KVCache(llm.config, 3, ids.shape[1])
        logits = prefill(llm.model, ids, valid, cache)
    tol = 1e-4 if dtype == "float32" else 2e-2  # bf16: rare 1-ulp flips of rounded outputs
    for row, p in enumerate(prompts):
        assert (logits[row] - llm.logits(p)[-1]).abs().max().item() <= tol


@pytest.mark.parametrize("variant", ["rw", "7b", "40b", "7b_rope_dynamic"])
def test_chunked_prefill_equals_unchunked(hf_checkpoints, variant):
    """Also with left padding cut by chunk edges, and dynamic RoPE past max_position (16)."""
    llm = falconet.load(hf_checkpoints[variant][1], dtype="float32")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (100, 61)]
    from falconet.models.dense import left_pad

    ids, valid = left_pad(prompts, torch.device("cpu"))
    with torch.inference_mode():
        whole = prefill(llm.model, ids, valid, KVCache(llm.config, 2, 100), True, chunk=100)
        chunked = prefill(llm.model, ids, valid, KVCache(llm.config, 2, 100), True, chunk=7)
    assert (whole[valid] - chunked[valid]).abs().max().item() <= 1e-5
    # and the one-forward result is HF's
    hf_model = hf_checkpoints[variant][0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompts[0]])).logits[0]
    assert (chunked[0] - ref).abs().max().item() <= 1e-4


LONG_SCRIPT = """
import resource, sys, torch, falconet
llm = falconet.load(sys.argv[1], dtype="float32")
ids = torch.randint(0, 400, (8192,), generator=torch.Generator().manual_seed(0)).tolist()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = llm.complete([ids], max_tokens=3, ignore_eos=True)[0]
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(len(out.token_ids), out.prompt_tokens, grew // 1024)
"""


@pytest.mark.parametrize("variant", ["rw", "7b"])
def test_8k_prompt_completes_without_quadratic_memory(hf_checkpoints, variant):
    """An 8,192-token prompt on a tiny model: one head's fp32 T² score matrix alone
    would be 256 MiB, so peak memory growth well under that shows no T² buffer."""
    folder = hf_checkpoints[variant][1]
    res = subprocess.run(
        [sys.executable, "-c", LONG_SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    n_tokens, n_prompt, grew_mib = map(int, res.stdout.split())
    assert (n_tokens, n_prompt) == (3, 8192)
    assert grew_mib < 200


def test_alibi_runs_past_max_position_embeddings(tmp_path):
    hf = build_hf_model("rw", max_position_embeddings=16)
    folder = save_hf_model(hf, tmp_path / "rw16")
    llm = falconet.load(folder, dtype="float32")
    ids = list(range(20, 60))  # 40 tokens, past the 16 the config names
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-4


def test_legacy_refinedweb_config_loads(tmp_path, hf_checkpoints):
    """A RefinedWebModel (7B custom-code) config with n_head/n_layer keys."""
    hf_model, folder = hf_checkpoints["7b"]
    legacy = tmp_path / "rw7b"
    legacy.mkdir()
    for f in folder.iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    cfg = hf_model.config
    (legacy / "config.json").write_text(json.dumps({
        "model_type": "RefinedWebModel", "architectures": ["RWForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
        "n_head": cfg.num_attention_heads, "n_layer": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size, "multi_query": True, "parallel_attn": True, "alibi": False,
        "bias": False, "layer_norm_epsilon": cfg.layer_norm_epsilon, "bos_token_id": 11, "eos_token_id": 11,
    }))  # fmt: skip
    llm = falconet.load(legacy, dtype="float32")
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (llm.logits(PROMPT) - ref).abs().max().item() <= 1e-4


def test_legacy_refinedweb_40b_config_with_n_head_kv(tmp_path, hf_checkpoints):
    hf_model, folder = hf_checkpoints["40b"]
    legacy = tmp_path / "rw40b"
    legacy.mkdir()
    for f in folder.iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    cfg = hf_model.config
    (legacy / "config.json").write_text(json.dumps({
        "model_type": "RefinedWeb", "n_head": cfg.num_attention_heads, "n_head_kv": cfg.num_kv_heads,
        "n_layer": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "parallel_attn": True, "alibi": False, "bias": False, "layer_norm_epsilon": cfg.layer_norm_epsilon,
    }))  # fmt: skip
    llm = falconet.load(legacy, dtype="float32")
    assert llm.config.new_decoder_architecture and llm.config.kv_heads == cfg.num_kv_heads
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (llm.logits(PROMPT) - ref).abs().max().item() <= 1e-4


def test_bf16_cached_decoding_equals_full_forward(hf_checkpoints):
    """bf16 weights: one token at a time (GEMV path) = all at once (tiled fp32 GEMM path)."""
    llm = falconet.load(hf_checkpoints["7b"][1], dtype="bfloat16")
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        full = llm.model(ids)[0]
        cache = KVCache(llm.config, 1, len(PROMPT))
        inc = torch.cat([llm.model(ids[:, t : t + 1], cache)[0] for t in range(len(PROMPT))])
    assert (inc - full).abs().max().item() <= 2e-2 * full.abs().max().item()
    assert torch.equal(inc.argmax(-1), full.argmax(-1))
    nine = llm.complete([PROMPT] * 9, max_tokens=10, ignore_eos=True)
    alone = llm.complete([PROMPT], max_tokens=10, ignore_eos=True)[0]
    assert all(c.token_ids == alone.token_ids for c in nine)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_stay_close(hf_checkpoints, dtype):
    """bf16/fp16 weights with fp32 compute on CPU: close to fp32, same greedy start."""
    hf_model, folder = hf_checkpoints["7b"]
    llm = falconet.load(folder, dtype=dtype)
    assert llm.model.lm_head.weight.dtype == getattr(torch, dtype)
    ref = falconet.load(folder, dtype="float32").logits(PROMPT)
    ours = llm.logits(PROMPT)
    assert (ours - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert ours[-1].argmax() == ref[-1].argmax()
