"""Normalisations the models share."""

from __future__ import annotations

import torch
from torch import nn

from falconet.nn import elementwise


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, as transformers' LlamaRMSNorm: normalized in
    fp32, rounded back to the input dtype, then scaled."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        # torch's ops, bit for bit transformers' norm, where the output is rounded to int8
        # next (BitNet): the compiled pass sums in another order, and a last-bit change
        # there moves an activation across a rounding boundary now and then
        self.torch_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.torch_ops:  # fp32 inference on a CPU: one compiled pass
            y = elementwise.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
