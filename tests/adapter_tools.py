"""PEFT LoRA adapters for the adapter tests, built by the `peft` library itself on tiny
transformers models (tests/conftest.py), with non-zero random A and B so every targeted
layer changes the output."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

FALCON_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(hf_model, folder: Path, targets: list[str], seed: int, **lora_kw):
    """Save a LoRA adapter of `hf_model` (left untouched) to `folder`; returns the PEFT
    model (base + adapter, eval mode), the numerical reference."""
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    kw.update(lora_kw)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(**kw))
    torch.manual_seed(seed)
    with torch.no_grad():  # PEFT starts B at zero: an adapter that changes nothing
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def peft_logits(peft_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(torch.tensor([ids])).logits[0].float()
