"""Falcon-Mamba (Mamba-1): parity with transformers.FalconMambaForCausalLM on tiny random
checkpoints with odd shapes (hidden 48, state 5, conv kernels 4 and 3, dt rank auto and
explicit, biases on and off, tied and untied heads), the recurrent state (chunked prefill
== one-shot, cached == uncached), loading a saved HF folder, and the config's checks.
The parity and state tests run on both CPU scan paths (`scan_path`): the compiled
kernel and the PyTorch fallback.

The folder is loaded here through the registry entry's `Architecture.layout` +
`load_weights` (what `falconet.load` does), so the model is tested apart from the engine
(tests/test_falcon_mamba_engine.py runs it through the engine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from falconet.errors import CheckpointError, ConfigError
from falconet.models import registry
from falconet.models.falcon_mamba import FalconMamba, MambaState
from falconet.models.falcon_mamba_config import FalconMambaConfig
from falconet.nn import selective_scan
from falconet.nn.linear import batch_invariant
from falconet.weights.hf import load_weights

VOCAB = 96
PROMPT = [5, 17, 42, 90, 3, 50, 7, 7, 30, 12, 64, 28, 1, 40, 33, 21, 8, 77, 15, 20, 9, 2, 61]
# name -> FalconMambaConfig keys over the tiny base
VARIANTS: dict[str, dict] = {
    "conv4_rank_auto": dict(conv_kernel=4, time_step_rank="auto"),
    "conv3_rank7_bias_no_conv_bias": dict(
        conv_kernel=3, time_step_rank=7, use_bias=True, use_conv_bias=False, mixer_rms_eps=1e-3
    ),
    "conv4_bias_untied": dict(conv_kernel=4, use_bias=True, tie_word_embeddings=False),
}
ARCH = registry.for_hf({"model_type": "falcon_mamba"})


def build_hf_model(variant: str, seed: int = 0):
    from transformers import FalconMambaConfig as HFConfig
    from transformers import FalconMambaForCausalLM

    torch.manual_seed(seed)
    keys = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        state_size=5,
        num_hidden_layers=3,
        expand=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = FalconMambaForCausalLM(HFConfig(**keys, **VARIANTS[variant])).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias") and "dt_proj" not in name:
                p.normal_(0, 0.1)
            elif name.endswith("out_proj.weight"):
                # at transformers' init the residual stream is mostly the token's own
                # embedding, so a tied head repeats the last token: greedy tests nothing
                p.mul_(10)
    return model


def load(folder: Path, dtype: torch.dtype = torch.float32) -> FalconMamba:
    config = FalconMambaConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = FalconMamba(config, dtype)
    load_weights(model, folder, ARCH.layout(config))
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for v in VARIANTS:
        model = build_hf_model(v)
        folder = tmp_path_factory.mktemp(v)
        model.save_pretrained(folder)  # safetensors
        out[v] = (model, folder)
    return out


@pytest.fixture(params=["compiled", "pytorch"])
def scan_path(request, monkeypatch) -> str:
    """The scan's two CPU paths: the compiled kernel, and the PyTorch fallback that runs
    where it is not built."""
    if request.param == "compiled" and not selective_scan.native_scan_available():
        pytest.skip("compiled kernels not built (python setup.py build_ext --inplace)")
    if request.param == "pytorch":
        monkeypatch.setattr(selective_scan, "native", None)
    return request.param


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def greedy(model: FalconMamba, prompt: list[int], n: int) -> list[int]:
    """Prefill, then decode one token at a time over the recurrent state."""
    state = model.new_state(1)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), state, last_only=True)
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
    with torch.inference_mode():
        ours = model(torch.tensor([PROMPT]))[0]
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert ours.shape == ref.shape == (len(PROMPT), VOCAB)
    assert max_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers_generate(checkpoints, variant, scan_path):
    hf_model, folder = checkpoints[variant]
    prompt = PROMPT[:8]
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(ref) == 32 and len(set(ref)) >= 8  # a real continuation, not one repeated token
    assert greedy(load(folder), prompt, 32) == ref


def test_module_names_are_transformers_names(checkpoints):
    for hf_model, folder in checkpoints.values():
        model = load(folder)
        ours = dict(model.named_parameters(remove_duplicate=False))
        theirs = hf_model.state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


# ---- the recurrent state -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunk", [5, 7])
def test_chunked_prefill_equals_one_shot(checkpoints, variant, chunk, scan_path):
    model = load(checkpoints[variant][1])

    def prefill() -> tuple[torch.Tensor, torch.Tensor, MambaState, MambaState]:
        ids = torch.tensor([PROMPT])
        whole, pieces = model.new_state(1), model.new_state(1)
        with torch.inference_mode():
            one_shot = model(ids, whole)[0]
            chunked = torch.cat(
                [model(ids[:, s : s + chunk], pieces)[0] for s in range(0, len(PROMPT), chunk)]
            )
        return one_shot, chunked, whole, pieces

    one_shot, chunked, whole, pieces = prefill()
    # the projections round by row count (a GEMM for 23 rows, the row kernel for 5)
    assert max_diff(chunked, one_shot) <= 1e-5
    assert max_diff(pieces.conv, whole.conv) <= 1e-5
    assert max_diff(pieces.ssm, whole.ssm) <= 1e-5
    assert whole.ssm.abs().max() > 0.01 and whole.conv.abs().max() > 0.01
    # with row-invariant projections the rest is the same elementwise arithmetic per
    # token however the prompt was cut: bit for bit
    with batch_invariant():
        one_shot, chunked, whole, pieces = prefill()
    assert torch.equal(chunked, one_shot)
    assert torch.equal(pieces.conv, whole.conv)
    assert torch.equal(pieces.ssm, whole.ssm)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_uncached_forward(checkpoints, variant, scan_path):
    model = load(checkpoints[variant][1])
    ids = torch.tensor([PROMPT])

    def both() -> tuple[torch.Tensor, torch.Tensor, MambaState, MambaState]:
        whole, stepped = model.new_state(1), model.new_state(1)
        with torch.inference_mode():
            full = model(ids, whole)[0]
            steps = [model(ids[:, :5], stepped)[0]]  # a 5-token prefill, then one at a time
            steps += [model(ids[:, t : t + 1], stepped)[0] for t in range(5, len(PROMPT))]
        return full, torch.cat(steps), whole, stepped

    full, steps, _, _ = both()
    assert max_diff(steps, full) <= 1e-5 * full.abs().max().item()
    # the decode step is the prefill scan's step: bit for bit with row-invariant projections
    with batch_invariant():
        full, steps, whole, stepped = both()
    assert torch.equal(steps, full)
    assert torch.equal(stepped.ssm, whole.ssm) and torch.equal(stepped.conv, whole.conv)


def test_batch_rows_are_independent_sequences(checkpoints):
    model = load(checkpoints["conv4_rank_auto"][1])
    a, b = PROMPT[:11], PROMPT[11:22]
    with torch.inference_mode():
        together = model(torch.tensor([a, b]))
        alone = torch.cat([model(torch.tensor([a])), model(torch.tensor([b]))])
        assert max_diff(together, alone) <= 1e-5
        with batch_invariant():
            together = model(torch.tensor([a, b]))
            alone = torch.cat([model(torch.tensor([a])), model(torch.tensor([b]))])
    assert torch.equal(together, alone)


def test_state_size_does_not_grow_with_the_sequence(checkpoints):
    model = load(checkpoints["conv3_rank7_bias_no_conv_bias"][1])
    config = model.config
    state = model.new_state(1)
    shapes = (state.conv.shape, state.ssm.shape)
    # (L, B, E, K - 1) and (L, B, E, N)
    assert shapes == ((3, 1, 96, 2), (3, 1, 96, 5))
    with torch.inference_mode():
        model(torch.tensor([PROMPT * 3]), state)
    assert (state.conv.shape, state.ssm.shape) == shapes
    assert state.nbytes == config.state_bytes_per_sequence(4) == 3 * (96 * 2 + 96 * 5) * 4


# ---- loading ----------------------------------------------------------------------------


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = checkpoints["conv4_bias_untied"][1]
    tensors = load_file(folder / "model.safetensors")
    del tensors["backbone.layers.1.mixer.A_log"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no tensor backbone\.layers\.1\.mixer\.A_log"):
        load(tmp_path)


def test_bfloat16_weights_load_and_stay_close(checkpoints):
    hf_model, folder = checkpoints["conv4_rank_auto"]
    model = load(folder, torch.bfloat16)
    assert model.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        ours = model(torch.tensor([PROMPT]))[0].float()
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert max_diff(ours, ref) <= 0.05 * ref.abs().max().item()


# ---- the config --------------------------------------------------------------------------


def test_config_reads_transformers_keys(checkpoints):
    for hf_model, _ in checkpoints.values():
        hf = hf_model.config
        config = FalconMambaConfig.from_hf(hf.to_dict())
        assert config.time_step_rank == hf.time_step_rank
        assert config.intermediate_size == hf.intermediate_size == 96
        for key in ("state_size", "conv_kernel", "use_bias", "use_conv_bias", "mixer_rms_eps"):
            assert getattr(config, key) == getattr(hf, key), key
        assert config.tie_word_embeddings == hf.tie_word_embeddings
        assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    auto = FalconMambaConfig.from_hf(
        {**checkpoints["conv4_rank_auto"][0].config.to_dict(), "time_step_rank": "auto"}
    )
    assert auto.time_step_rank == math.ceil(48 / 16) == 3
    again = FalconMambaConfig.from_hf(auto.to_hf())
    assert again == auto


def _hf_dict(**over) -> dict:
    d = dict(
        model_type="falcon_mamba",
        vocab_size=96,
        hidden_size=48,
        state_size=5,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        time_step_rank="auto",
    )
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize(
    "key, value",
    [
        ("state_size", None),  # missing
        ("hidden_size", None),
        ("state_size", 0),
        ("conv_kernel", 1),
        ("expand", 1.5),
        ("time_step_rank", "big"),
        ("time_step_rank", 0),
        ("use_conv_bias", "yes"),
        ("use_bias", 1),
        ("mixer_rms_eps", -1.0),
        ("layer_norm_epsilon", float("nan")),
        ("hidden_act", "gelu"),
        ("num_hidden_layers", True),
        ("eos_token_id", -3),
    ],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        FalconMambaConfig.from_hf(_hf_dict(**{key: value}))


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "falcon", "hidden_size": 48}')
    with pytest.raises(ConfigError, match=r"config\.json.*not a Falcon-Mamba model"):
        FalconMambaConfig.from_file(path)


def test_state_zeros_layout():
    config = FalconMambaConfig.from_hf(_hf_dict(conv_kernel=3, state_size=7))
    state = MambaState.zeros(config, 4, torch.bfloat16)
    assert state.conv.shape == (2, 4, 96, 2) and state.conv.dtype == torch.bfloat16
    assert state.ssm.shape == (2, 4, 96, 7) and state.ssm.dtype == torch.float32
