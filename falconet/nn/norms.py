"""Normalisations the models share."""

from __future__ import annotations

import torch
from torch import nn

from falconet.nn import elementwise


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, as transformers' LlamaRMSNorm
    (elementwise.rms_norm)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        # torch's ops, bit for bit transformers' norm, where the output is rounded to int8
        # next (BitNet): the compiled pass sums in another order, and a last-bit change
        # there moves an activation across a rounding boundary now and then
        self.torch_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise.rms_norm(x, self.weight, self.eps, self.torch_ops)
