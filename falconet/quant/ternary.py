"""Ternary (BitNet b1.58) linear layers: Falcon-E and Falcon3-*-1.58bit.

These checkpoints are Llama-shaped (`model_type: llama`) with a `quantization_config`
whose `quant_method` is `bitnet`: every decoder projection holds weights in {-1, 0, +1}
times one scale per matrix, and its input is rounded per token to int8 (absmax) before
the product, so the matmul is integer. transformers' `integrations/bitnet.py` defines the
numerics this module reproduces:

- packed storage (`BitLinear`): a uint8 tensor [N/4, K], four 2-bit codes per byte,
  code = w + 1. Byte r of column k holds the weights of output rows r, r + N/4,
  r + 2N/4 and r + 3N/4 at bits 0-1, 2-3, 4-5, 6-7. `weight_scale` [1] is the
  *inverse* scale: y = (x_q @ w.T) / (weight_scale * x_scale).
- `autobitlinear` + `offline`: the same packed bytes, but the scale multiplies:
  y = ((x_q / x_scale) @ w.T) * weight_scale.
- `autobitlinear` + `online` (the unquantized bf16 revision used for fine-tuning):
  float weights, ternarized as they are used with the absmean rule
  s = 1 / mean|W|, w = clamp(round(W * s), -1, 1), y = (x_q @ w.T) / (s * x_scale).
  falconet ternarizes once at load, to exactly the codes and scale that rule gives, and
  then runs the packed path.
- `use_rms_norm`: an RMSNorm (own weight, `<linear>.rms_norm.weight`) on each
  projection's input before the activations are rounded.

The integer product never becomes a float weight on the fast paths: the compiled kernel
(`ternary_matmul` in _kernels.c, kernels_ternary.h) and on CUDA the Triton one
(triton_kernels.ternary_matmul: int8 tensor-core dots) read the packed bytes as they are
stored, with int8 activations and int32 sums. The PyTorch fallback unpacks to float
{-1, 0, 1} and multiplies int8-valued floats; every product and partial sum is an
integer below 2^24 (K <= MAX_K), so fp32 holds it exactly and both paths give the same
bits. A row's result depends only on that row: batching is exact by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from falconet.errors import ConfigError

try:
    from falconet.quant import _kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

CODES_PER_BYTE = 4
# fp32 holds every integer below 2^24 exactly; 127 * K must stay below it for the
# float fallback to equal the integer kernel.
MAX_K = (1 << 24) // 128
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")


@dataclass(frozen=True)
class BitNetConfig:
    """config.json's `quantization_config` with `quant_method: bitnet` (transformers'
    BitNetQuantConfig keys)."""

    linear_class: str = "bitlinear"
    quantization_mode: str = "offline"
    use_rms_norm: bool = False
    rms_norm_eps: float = 1e-6
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, q: dict[str, Any]) -> BitNetConfig:
        kw = {k: q[k] for k in ("linear_class", "quantization_mode", "use_rms_norm") if k in q}
        if q.get("rms_norm_eps") is not None:
            kw["rms_norm_eps"] = q["rms_norm_eps"]
        skip = q.get("modules_to_not_convert") or ()
        if not isinstance(skip, list | tuple) or not all(isinstance(s, str) for s in skip):
            raise ConfigError(
                f"config: quantization_config.modules_to_not_convert must be a list of names, got {skip!r}"
            )
        config = cls(**kw, modules_to_not_convert=tuple(skip))
        if config.linear_class not in LINEAR_CLASSES:
            raise ConfigError(
                f"config: quantization_config.linear_class {config.linear_class!r} is not one of "
                f"{', '.join(LINEAR_CLASSES)}"
            )
        if config.quantization_mode not in QUANTIZATION_MODES:
            raise ConfigError(
                f"config: quantization_config.quantization_mode {config.quantization_mode!r} is "
                f"not one of {', '.join(QUANTIZATION_MODES)}"
            )
        if not isinstance(config.use_rms_norm, bool):
            raise ConfigError(
                f"config: quantization_config.use_rms_norm must be true or false, got {config.use_rms_norm!r}"
            )
        eps = config.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ConfigError(
                f"config: quantization_config.rms_norm_eps must be a positive number, got {eps!r}"
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        return {
            "quant_method": "bitnet",
            "linear_class": self.linear_class,
            "quantization_mode": self.quantization_mode,
            "use_rms_norm": self.use_rms_norm,
            "rms_norm_eps": self.rms_norm_eps,
            "modules_to_not_convert": list(self.modules_to_not_convert) or None,
        }

    @property
    def packed(self) -> bool:
        """Whether the checkpoint stores packed codes + weight_scale (else float weights)."""
        return self.quantization_mode == "offline"

    @property
    def scale_divides(self) -> bool:
        """transformers' BitLinear divides by weight_scale; offline AutoBitLinear multiplies."""
        return not (self.linear_class == "autobitlinear" and self.quantization_mode == "offline")

    def converts(self, module_name: str) -> bool:
        """Whether the projection `module_name` (full HF name) is ternary. transformers
        skips a module a pattern of modules_to_not_convert matches: as a regex from the
        start up to a module boundary ("model.layers.1" skips layer 1, not layer 11), or
        as a plain suffix."""
        return not any(
            re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module_name) or module_name.endswith(p)
            for p in self.modules_to_not_convert
        )


# ---- codes ------------------------------------------------------------------------------


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] in {-1, 0, 1} -> uint8 [N/4, K] (the layout in the module docstring)."""
    N = codes.shape[0]
    if N % CODES_PER_BYTE:
        raise ValueError(f"packing needs a multiple of 4 rows, got {N}")
    u = (codes.to(torch.int16) + 1).to(torch.uint8).view(CODES_PER_BYTE, N // 4, -1)
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [N/4, K] -> [N, K] of {-1, 0, 1} in `dtype`."""
    parts = [((packed >> (2 * i)) & 3) for i in range(CODES_PER_BYTE)]
    return torch.cat(parts).to(dtype) - 1


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (codes int8 [N, K], scale fp32 [1]) by the absmean rule transformers'
    WeightQuant applies (in fp32): s = 1 / max(mean|W|, 1e-5), codes = clamp(round(W s), -1, 1)."""
    w = w.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    codes = (w * scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale.reshape(1)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax rounding to int8, as transformers' BitLinear.activation_quant:
    scale = 127 / max(max|x|, 1e-5), q = clamp(round(x * scale), -128, 127)."""
    scale = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (x * scale).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def ternary_matmul(
    xq: torch.Tensor, packed: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """int8 [M, K] x packed [N/4, K] -> exact integer products [M, N] as fp32 (integers
    below 2^24, so exact), by the compiled kernel on a CPU, the Triton kernel on CUDA, else
    the PyTorch reference: the same bits from each."""
    M, K = xq.shape
    N = packed.shape[0] * CODES_PER_BYTE
    if K > MAX_K:
        raise ValueError(f"ternary layers take at most {MAX_K} input features, got {K}")
    if native is not None and hasattr(native, "ternary_matmul") and xq.is_cpu and packed.is_cpu:
        xq, packed = xq.contiguous(), packed.contiguous()
        acc = torch.empty(M, N, dtype=torch.int32)
        native.ternary_matmul(
            xq.data_ptr(), packed.data_ptr(), acc.data_ptr(), M, K, N // CODES_PER_BYTE,
            threads or torch.get_num_threads(),
        )  # fmt: skip
        return acc.float()
    if xq.is_cuda:
        from falconet.quant import triton_kernels  # imports triton: only where it can run

        if triton_kernels.available():
            return triton_kernels.ternary_matmul(xq, packed).float()
    return reference_matmul(xq, packed)


def reference_matmul(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`ternary_matmul` in PyTorch: the codes as float {-1, 0, 1}, exact in fp32. A BLAS
    may split K into partial sums in any order; integers below 2^24 add exactly."""
    return F.linear(xq.float(), unpack_ternary(packed, torch.float32))


# ---- the layer --------------------------------------------------------------------------


class TernaryLinear(nn.Module):
    """Module swap for `Linear` in a BitNet checkpoint: `weight` holds the packed codes
    (uint8 [N/4, K]), `weight_scale` the per-matrix scale, both as HF names them."""

    qtype = "ternary"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bitnet: BitNetConfig,
        compute_dtype: torch.dtype = torch.float32,
        sub_norm: nn.Module | None = None,
    ) -> None:
        """`sub_norm`: the RMSNorm before the product (`use_rms_norm`), built by the model
        (nn/ norms sit above this storage layer), stored as `<linear>.rms_norm.weight`."""
        super().__init__()
        if bitnet.use_rms_norm != (sub_norm is not None):
            raise ConfigError("config: use_rms_norm needs a sub-norm on every ternary projection")
        if out_features % CODES_PER_BYTE:
            raise ConfigError(
                f"config: a ternary projection needs a multiple of 4 output features, got {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.scale_divides = bitnet.scale_divides
        self.compute_dtype = compute_dtype
        rows = out_features // CODES_PER_BYTE
        self.weight = nn.Parameter(
            torch.zeros(rows, in_features, dtype=torch.uint8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False)
            if bias
            else None
        )
        self.rms_norm = sub_norm

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, qtype=ternary"

    @property
    def weight_numel(self) -> int:
        """Weights the packed bytes stand for (N x K)."""
        return self.out_features * self.in_features

    def load_float(self, w: torch.Tensor) -> None:
        """Ternarize a float [N, K] weight (the unquantized revision) into codes + scale."""
        codes, scale = ternarize(w)
        self.weight = nn.Parameter(pack_ternary(codes), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        shape = x.shape
        xq, x_scale = quantize_activations(x.reshape(-1, shape[-1]))  # (M, K) int8, (M, 1)
        acc = ternary_matmul(xq, self.weight)  # (M, N) exact integers
        ws = self.weight_scale.to(x_scale.dtype)
        # transformers' order of rounding: BitLinear divides once by the product of the
        # two scales; offline AutoBitLinear dequantizes the activations, then multiplies.
        y = acc / (ws * x_scale) if self.scale_divides else acc / x_scale * ws
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


def ternary_tensors(
    module: str, shape: tuple[int, ...], bitnet: BitNetConfig
) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The HF tensors of ternary projection `module` whose float weight is [N, K]: name ->
    shape, and which of them are packed uint8 codes."""
    N, K = shape
    if not bitnet.packed:  # the unquantized revision: the float weight, ternarized at load
        tensors: dict[str, tuple[int, ...]] = {f"{module}.weight": (N, K)}
        packed: set[str] = set()
    else:
        tensors = {f"{module}.weight": (N // CODES_PER_BYTE, K), f"{module}.weight_scale": (1,)}
        packed = {f"{module}.weight"}
    if bitnet.use_rms_norm:
        tensors[f"{module}.rms_norm.weight"] = (K,)
    return tensors, packed


def ternary_weight(
    stored: torch.Tensor, scale: torch.Tensor | None, bitnet: BitNetConfig
) -> torch.Tensor:
    """A ternary projection's weight as the float [N, K] matrix it stands for (what a GGUF
    file of the model holds): packed codes over (or times) their scale, or the float
    weight of the unquantized revision ternarized as at load. ValueError if the stored
    tensors are not of that form."""
    if not bitnet.packed:
        codes, s = ternarize(stored)
        return codes.float() / s
    if stored.dtype != torch.uint8 or stored.ndim != 2:
        raise ValueError(
            f"expected packed uint8 codes [N/4, K], got {stored.dtype} {tuple(stored.shape)}"
        )
    if scale is None or scale.numel() != 1 or not scale.is_floating_point():
        got = None if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        raise ValueError(f"expected one float weight_scale, got {got}")
    codes, s = unpack_ternary(stored, torch.float32), scale.float().reshape(())
    return codes / s if bitnet.scale_divides else codes * s
