"""The recurrent Falcons quantized at load (`--quant`) and in bf16: every matrix that
holds whole blocks is quantized byte-equal to quantizing the HF tensor, the SSM
parameters (A_log, D, dt_bias, conv, norms) stay float as llama.cpp keeps them, and the
logits are transformers' on the same rounded weights up to activation rounding; bf16
compute stays near fp32 and runs through the engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import falconet
from falconet.quant import get_format
from falconet.quant.linear import QuantEmbedding, QuantLinear
from tests.conftest import build_falcon_h1_hf_model, build_falcon_mamba_hf_model, save_hf_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 290, 12, 64, 128, 1, 200, 33, 21, 8, 77, 150]
# parameters llama.cpp keeps in float in every quantized file
FLOAT_KEPT = ("A_log", ".D", "dt_bias", "conv1d", "norm")


def builders():
    return {
        "falcon_mamba": lambda: build_falcon_mamba_hf_model("conv4_tied"),
        "falcon_h1": lambda: build_falcon_h1_hf_model("gate_then_norm"),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, build in builders().items():
        hf = build()
        out[name] = (hf, save_hf_model(hf, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("arch", list(builders()))
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_at_load(checkpoints, arch, quant):
    hf_model, folder = checkpoints[arch]
    llm = falconet.load(folder, quant=quant)
    hf_state = hf_model.state_dict()
    rounded = copy.deepcopy(hf_model)
    params = dict(rounded.named_parameters())
    quantized = 0
    for name, module in llm.model.named_modules():
        if isinstance(module, QuantLinear | QuantEmbedding):
            kind = get_format(module.qtype if isinstance(module, QuantLinear) else module.fmt.name)
            key = f"{name}.weight"
            if key not in hf_state:  # the tied head shares the embedding's blocks
                continue
            want = kind.quantize(hf_state[key].numpy())
            blocks = module.weight if isinstance(module, QuantLinear) else module.weight_blocks
            assert np.array_equal(blocks.data.numpy(), want), name
            with torch.no_grad():
                params[key].copy_(
                    torch.from_numpy(kind.dequantize(want, tuple(hf_state[key].shape)))
                )
            quantized += 1
    assert quantized >= 2 * llm.config.num_hidden_layers  # the mixers' projections at least
    for name, p in llm.model.named_parameters():
        if any(k in name for k in FLOAT_KEPT):
            assert p.dtype == torch.float32, name
    with torch.no_grad():
        ref = rounded(torch.tensor([PROMPT])).logits[0]
    # what is left is falconet rounding activations to 8 bits per block for the integer
    # kernels, as llama.cpp does
    ours = llm.logits(PROMPT)
    assert (ours - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("arch", list(builders()))
def test_bf16_stays_near_fp32_through_the_engine(checkpoints, arch):
    _, folder = checkpoints[arch]
    fp32, bf16 = falconet.load(folder, dtype="float32"), falconet.load(folder, dtype="bfloat16")
    assert "bfloat16" in bf16.model.storage_summary()  # compute: what the CPU does best
    a, b = fp32.logits(PROMPT), bf16.logits(PROMPT)  # the engine's packed forward
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()
    [done] = bf16.complete([PROMPT], max_tokens=6, ignore_eos=True)
    assert len(done.token_ids) == 6
