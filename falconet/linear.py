"""`Linear`: nn.Linear whose weight may be stored in a narrower dtype than the compute.

CPUs without native bf16 matmul (AVX2, most AVX-512) multiply bf16 matrices several
times slower than fp32, yet a bf16 weight read at memory bandwidth is what decode wants.
So the weight keeps its storage dtype, and the layer computes what a bf16 (or fp16)
linear layer computes -- inputs rounded to the weight dtype, products accumulated in
fp32, the result rounded to the weight dtype -- by whichever path is fast for the shape:

- decode (a few rows): PyTorch's low-precision GEMV, which streams the weight at memory
  bandwidth;
- prefill (many rows): upcast the weight one tile of output features at a time into a
  small reusable fp32 buffer and run fp32 GEMMs on the rounded inputs, so no full fp32
  copy of the weight ever exists and the conversion stays in cache.

Both paths round at the same two places, so a row's result does not depend on how many
rows share the call (a batch of 9 equals each row alone, cached decode equals a full
forward) beyond fp32 accumulation order, which flips a rounded output in about one
element in 10^4.

Measured on the 2-core AVX2 dev machine for a 8192x2048 weight and 128 rows: bf16 GEMM
157 ms, fp32 GEMM 41 ms, tiled bf16->fp32 + GEMM 39 ms (benchmarks/bench_generate.py
measures the whole model).

The bias is added after the matmul, not fused into it: Falcon was trained that way and
transformers keeps the extra rounding step (`FalconLinear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows at or above which the tiled upcast beats the low-precision matmul on CPU.
PREFILL_ROWS = 8
# Bytes of the fp32 weight tile; a few MB stays in L2/L3 while the GEMM reuses it.
TILE_BYTES = 4 << 20


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(
                torch.empty(out_features, dtype=bias_dtype or dtype, device=device),
                requires_grad=False,
            )
            if bias
            else None
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, weight={self.weight.dtype}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype:
            y = F.linear(x, w)
        elif x.device.type == "cpu" and x.numel() // self.in_features >= PREFILL_ROWS:
            y = _tiled_upcast_linear(x.to(w.dtype).to(x.dtype), w).to(w.dtype).to(x.dtype)
        else:
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def _tiled_upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with w upcast to x.dtype one tile of output rows at a time."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    out_features, in_features = w.shape
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    tile = max(16, TILE_BYTES // (in_features * x.element_size()))
    buf = torch.empty(min(tile, out_features), in_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, tile):
        stop = min(start + tile, out_features)
        b = buf[: stop - start]
        b.copy_(w[start:stop])
        y[:, start:stop] = rows @ b.t()
    return y.view(*x.shape[:-1], out_features)
