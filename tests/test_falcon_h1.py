"""Falcon-H1: parity with transformers.FalconH1ForCausalLM on tiny random checkpoints
(two Mamba groups, mamba_d_head 6, every muP multiplier away from 1, a chunk size that
divides no prompt, GQA 4/2, gated norm on/off and before/after the gate, a clamped
time step), the state (chunked prefill, cached decode), the SSD scan against its
recurrence, loading a saved HF folder and FalconH1Config's checks. The parity and state
tests run on both CPU scan paths (`scan_path`): the compiled recurrence and the PyTorch
forms (tests/test_scan_kernels.py compares the two directly)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from falconet.errors import CheckpointError, ConfigError, GenerationError
from falconet.models.falcon_h1 import FalconH1
from falconet.models.falcon_h1_config import FalconH1Config
from falconet.models.registry import Architecture
from falconet.nn import ssd
from falconet.nn.ssd import torch_ssd_chunked, torch_ssd_step
from falconet.weights.hf import load_weights
from tests.conftest import (
    FALCON_H1_BASE,
    FALCON_H1_VARIANTS,
    build_falcon_h1_hf_model,
    hf_greedy,
)

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 290, 12, 64, 128, 1, 200, 33, 21, 8, 77, 150, 201, 9, 4, 60]

BASE = FALCON_H1_BASE
VARIANTS = FALCON_H1_VARIANTS
# The decode step does not clamp dt (as transformers): a clamped model's cached decode
# differs from its full forward, in transformers too.
UNCLAMPED = [v for v in VARIANTS if "clamped" not in v]


def build_hf(variant: str, changes: dict | None = None):
    return build_falcon_h1_hf_model(variant, changes)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for v in VARIANTS:
        model = build_hf(v)
        folder = tmp_path_factory.mktemp(v)
        model.save_pretrained(folder)
        out[v] = (model, folder)
    return out


def load(folder: Path) -> FalconH1:
    """The model as falconet's loader would build it (on the meta device, then filled
    through the checkpoint layout), without registering the architecture."""
    config = FalconH1Config.from_file(folder / "config.json")
    arch = Architecture("falcon_h1", FalconH1, FalconH1Config, ("falcon_h1",), (), "")
    with torch.device("meta"):
        model = FalconH1(config)
    load_weights(model, folder, arch.layout(config))
    model.tie_weights()
    return model


@pytest.fixture(params=["compiled", "pytorch"])
def scan_path(request, monkeypatch) -> str:
    """The SSD scan's two CPU paths: the compiled recurrence, and the PyTorch forms that
    run where it is not built."""
    if request.param == "compiled" and not ssd.native_ssd_scan_available():
        pytest.skip("compiled kernels not built (python setup.py build_ext --inplace)")
    if request.param == "pytorch":
        monkeypatch.setattr(ssd, "native", None)
    return request.param


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def greedy(model: FalconH1, prompt: list[int], n: int, prefill_chunk: int = 64) -> list[int]:
    state = model.new_state(1, len(prompt) + n)
    ids = torch.tensor([prompt])
    for start in range(0, len(prompt), prefill_chunk):
        logits = model(ids[:, start : start + prefill_chunk], state)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), state)
    return out


# ---- parity with transformers ---------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant, scan_path):
    hf_model, folder = checkpoints[variant]
    model = load(folder)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref = hf_model(ids).logits
    got = model(ids)
    assert ref.abs().max() > 1.0  # logits that carry the weights, not near-zero noise
    assert max_diff(got, ref) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_generate(checkpoints, variant, scan_path):
    hf_model, folder = checkpoints[variant]
    model = load(folder)
    expected = hf_greedy(hf_model, PROMPT, 32)
    assert greedy(model, PROMPT, 32) == expected
    if not model.config.tie_word_embeddings:  # a random tied head echoes one token
        assert len(set(expected)) > 1


def test_dynamic_rope_matches_transformers(tmp_path):
    """Dynamic (NTK) rope past max_position_embeddings: the base grows with the length at
    each call, in transformers' generate as here (so not in the chunked/cached matrix)."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    hf_model = build_hf("dynamic_rope", dict(max_position_embeddings=16, rope_parameters=dynamic))
    hf_model.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.config.rope_scaling_type == "dynamic"
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert max_diff(model(ids), hf_model(ids).logits) < 1e-4
    assert greedy(model, PROMPT, 32) == hf_greedy(hf_model, PROMPT, 32)


def test_every_multiplier_reaches_the_logits(checkpoints):
    """Each muP multiplier changes the logits: none is read and then ignored."""
    hf_model, folder = checkpoints["gate_then_norm"]
    model = load(folder)
    ids = torch.tensor([PROMPT])
    base = model(ids)
    changes = {
        name: dataclasses.replace(model.config, **{name: getattr(model.config, name) * 1.1})
        for name in (
            "embedding_multiplier", "lm_head_multiplier", "key_multiplier",
            "attention_in_multiplier", "attention_out_multiplier", "ssm_in_multiplier",
            "ssm_out_multiplier",
        )
    }  # fmt: skip
    for i in range(5):
        m = list(model.config.ssm_multipliers)
        m[i] *= 1.1
        changes[f"ssm_multipliers[{i}]"] = dataclasses.replace(
            model.config, ssm_multipliers=tuple(m)
        )
    for i in range(2):
        m = list(model.config.mlp_multipliers)
        m[i] *= 1.1
        changes[f"mlp_multipliers[{i}]"] = dataclasses.replace(
            model.config, mlp_multipliers=tuple(m)
        )
    for name, config in changes.items():
        other = FalconH1(config)
        other.load_state_dict(model.state_dict())
        assert max_diff(other(ids), base) > 1e-3, name


# ---- the state: chunked prefill, cached decode ----------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_equals_one_forward(checkpoints, variant, chunk, scan_path):
    model = load(checkpoints[variant][1])
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    whole = model(ids)
    state = model.new_state(2, len(PROMPT))
    pieces = [model(ids[:, s : s + chunk], state) for s in range(0, len(PROMPT), chunk)]
    assert max_diff(torch.cat(pieces, dim=1), whole) < 1e-5
    assert state.length == len(PROMPT)


@pytest.mark.parametrize("variant", UNCLAMPED)
def test_cached_decode_equals_uncached(checkpoints, variant, scan_path):
    model = load(checkpoints[variant][1])
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    state = model.new_state(2, len(PROMPT))
    model(ids[:, :10], state)
    for t in range(10, len(PROMPT)):
        cached = model(ids[:, t : t + 1], state)[:, 0]
        uncached = model(ids[:, : t + 1])[:, -1]
        assert max_diff(cached, uncached) < 1e-5


def test_state_is_fixed_size_and_fp32(checkpoints):
    model = load(checkpoints["gate_then_norm"][1])
    c = model.config
    state = model.new_state(3, 40)
    assert state.ssm.shape == (2, 3, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state)
    assert state.ssm.dtype == torch.float32
    assert state.conv.shape == (2, 3, c.conv_dim, c.mamba_d_conv - 1)
    assert state.kv.k.shape == (2, 3, c.kv_heads, 40, c.head_dim)
    before = state.ssm.clone()
    model(torch.tensor([PROMPT[:4]] * 3), state)
    assert not torch.equal(state.ssm, before)


def test_state_misuse_is_a_generation_error(checkpoints):
    model = load(checkpoints["gate_then_norm"][1])
    state = model.new_state(2, 8)
    with pytest.raises(GenerationError, match="state holds 2 sequences"):
        model(torch.tensor([PROMPT[:3]]), state)
    model(torch.tensor([PROMPT[:6]] * 2), state)
    ssm = state.ssm.clone()
    with pytest.raises(GenerationError, match="KV cache holds 8 tokens"):
        model(torch.tensor([PROMPT[:3]] * 2), state)
    assert torch.equal(state.ssm, ssm) and state.length == 6  # refused before any update


# ---- the scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_ssd_chunked_equals_the_recurrence(chunk_size):
    """The chunked matrix form (with a carried initial state) equals the recurrence token
    by token (the PyTorch forms: on CPU with the kernel built both would be the kernel)."""
    torch.manual_seed(0)
    Bt, T, H, P, G, N = 2, 19, 6, 5, 3, 4
    x = torch.randn(Bt, T, H, P)
    dt = torch.rand(Bt, T, H) * 0.5
    A = -torch.rand(H) * 2 - 0.1
    B, C = torch.randn(Bt, T, G, N), torch.randn(Bt, T, G, N)
    D = torch.randn(H)
    init = torch.randn(Bt, H, P, N)
    y, final = torch_ssd_chunked(x, dt, A, B, C, D, chunk_size, init.clone())
    state = init.clone()
    steps = [torch_ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(T)]
    assert max_diff(y, torch.stack(steps, dim=1)) < 1e-4
    assert max_diff(final, state) < 1e-4


# ---- loading ----------------------------------------------------------------------------


def test_checkpoint_layout_is_the_hf_state_dict(checkpoints):
    for variant, (hf_model, _) in checkpoints.items():
        config = FalconH1Config.from_hf(hf_model.config.to_dict())
        layout = FalconH1.checkpoint_layout(config).shapes
        hf = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            hf.pop("lm_head.weight")
        assert layout == hf, variant


def test_missing_tensor_names_it(checkpoints, tmp_path):
    hf_model, folder = checkpoints["norm_then_gate"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = {k: v for k, v in hf_model.state_dict().items() if k != "model.layers.1.mamba.A_log"}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mamba\.A_log"):
        load(tmp_path)


# ---- FalconH1Config ---------------------------------------------------------------------


def hf_dict(**changes) -> dict:
    d = json.loads(transformers.FalconH1Config(**BASE).to_json_string())
    d.update(changes)
    return d


def test_config_reads_hf_json():
    c = FalconH1Config.from_hf(hf_dict())
    assert (c.mamba_d_ssm, c.mamba_d_head, c.conv_dim, c.in_proj_size) == (24, 6, 56, 84)
    assert c.time_step_limit == (0.0, float("inf"))  # transformers writes {"__float__": ...}
    assert c.rope_theta == 1e11 and c.head_dim == 10 and c.kv_heads == 2
    assert c.ssm_multipliers == (0.5, 1.5, 0.75, 1.3, 0.6)
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e11}
    scaled = FalconH1Config.from_hf(hf_dict(rope_parameters=linear))
    assert (scaled.rope_scaling_type, scaled.rope_scaling_factor) == ("linear", 2.0)
    auto = FalconH1Config.from_hf(hf_dict(mamba_d_ssm=None, mamba_d_head="auto", mamba_n_heads=8))
    assert (auto.mamba_d_ssm, auto.mamba_d_head) == (64, 8)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(mamba_n_heads=None), "no mamba_n_heads"),  # missing
        (dict(mamba_d_state=None), "no mamba_d_state"),
        (dict(mamba_d_head=5), "mamba_d_head"),
        (dict(mamba_n_heads=5, mamba_d_head="auto"), "mamba_n_heads"),
        (dict(ssm_multipliers=[1.0, 1.0, 1.0, 1.0]), "ssm_multipliers"),
        (dict(mlp_multipliers=[1.0, "x"]), "mlp_multipliers"),
        (dict(time_step_limit=[1.0, 0.5]), "time_step_limit"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(mamba_d_state=0), "mamba_d_state"),
        (dict(mamba_rms_norm="yes"), "mamba_rms_norm"),
        (dict(key_multiplier=None, attention_in_multiplier="2"), "attention_in_multiplier"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(model_type="falcon_mamba"), "model_type"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
            "rope_scaling",
        ),
    ],
)
def test_bad_config_names_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        FalconH1Config.from_hf(hf_dict(**changes))
