"""LoRA (Hu et al., 2021): train a low-rank update beside each chosen linear layer.

A target layer y = x W^T + b becomes y = x W^T + b + scaling * dropout(x) A^T B^T, with
A (r, in) drawn as PEFT draws it (kaiming-uniform, bound 1/sqrt(in)), B (out, r) zero
(so training starts at the base model) and scaling = alpha / r. W stays frozen; only A
and B learn. Merging folds the update into W (W + scaling * B A), which is what
`falconet finetune` publishes by default.

Layers are named as the model's modules, which are the HF checkpoint's names
(`transformer.h.0.self_attention.query_key_value`), so a target pattern and a PEFT
adapter name the same thing. A pattern without wildcards matches a layer whose name is
it or ends with "." + it (PEFT's rule: "query_key_value", "self_attn.q_proj"); one with
* ? [ ] is matched against the whole name (fnmatch).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from falconet.errors import FalconetError
from falconet.nn.linear import Linear


class LoRALinear(nn.Module):
    """A frozen `Linear` plus its trainable low-rank update."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, g: torch.Generator):
        super().__init__()
        self.base = base
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.rand(rank, base.in_features, generator=g, dtype=torch.float32) * 2 - 1
        self.lora_A = nn.Parameter((a * bound).to(base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=base.weight.device)
        )  # (out, r)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = F.linear(
            F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)
        )
        return y + (update * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """scaling * B A (out, in) in fp32: what merging adds to W."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA may target (every `Linear` but the LM head)."""
    return [n for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def match_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The layers the patterns name (all of them for no pattern); a pattern that names
    none is an error, so a typo never trains nothing."""
    layers = linear_layers(model)
    if not patterns:
        return layers
    for p in patterns:
        if not any(_matches(n, p) for n in layers):
            example = layers[0] if layers else "none"
            raise FalconetError(
                f"--lora-targets {p!r} matches no linear layer of this model (they are named "
                f"like {example})"
            )
    return [n for n in layers if any(_matches(n, p) for p in patterns)]


def add_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int
) -> dict[str, LoRALinear]:
    """Wrap each target layer in a LoRALinear (in place) and freeze everything else."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    added = {}
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = LoRALinear(getattr(owner, child), rank, alpha, dropout, g)
        setattr(owner, child, layer)
        added[name] = layer
    return added


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain Linear back."""
    for name, layer in lora_layers(model).items():
        base = layer.base
        merged = base.weight.detach().float() + layer.delta().to(base.weight.device)
        base.weight = nn.Parameter(merged.to(base.weight.dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
