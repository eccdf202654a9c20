"""Elementwise functions whose bits for a row do not depend on the other rows.

PyTorch's CPU elementwise kernels run a vectorized body and a scalar tail: the last
(numel mod 2 x vector width) elements of a call, and of each thread's share of a large
call, go through the scalar routine. For exact ops (add, mul, div, sqrt) both give the
same bits, but transcendental ones (exp in silu, softplus, sigmoid; erf and tanh in
GELU) use different approximations, one ulp apart now and then. Which elements land in
the tail depends on how many rows share the call, so a sequence packed with neighbours
could get other activations than alone -- and then other tokens.

`invariant(fn)` wraps an elementwise fn so that, inside `batch_invariant()` on a CPU
tensor, every element is computed by the vectorized body: the rows are padded to a
multiple of ROW_ALIGN elements and fed in slices of at most SLICE_ELEMENTS elements
(under PyTorch's parallel grain, so one thread, no tail). A row too wide for one slice
is fed alone, where every row splits across threads the same way. Elsewhere (autograd,
CUDA, outside the engine) it is fn itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from falconet.nn.linear import batch_invariant_active, native

# A multiple of twice the widest CPU vector (AVX-512: 16 fp32 lanes, or 32 bf16).
ROW_ALIGN = 64
# Below at::internal::GRAIN_SIZE (32768), so PyTorch runs the slice on one thread.
SLICE_ELEMENTS = 32768 - ROW_ALIGN


def invariant(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn, elementwise, made row-invariant inside batch_invariant() (module docstring)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        if not batch_invariant_active() or x.device.type != "cpu" or x.requires_grad:
            return fn(x)
        width = x.shape[-1]
        padded = -(-width // ROW_ALIGN) * ROW_ALIGN
        rows = x.reshape(-1, width)
        if padded != width:
            rows = F.pad(rows, (0, padded - width))
        step = max(1, SLICE_ELEMENTS // padded)
        if rows.shape[0] <= step:  # one slice (a decode step): no copy through cat
            out = fn(rows)
        else:
            out = torch.cat([fn(rows[i : i + step]) for i in range(0, rows.shape[0], step)])
        return out[:, :width].reshape(x.shape)

    apply.__name__ = getattr(fn, "__name__", "elementwise")
    return apply


silu = invariant(F.silu)
softplus = invariant(F.softplus)
_torch_gelu = invariant(F.gelu)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU. On a CPU tensor outside autograd, the compiled kernel
    (kernels_activation.h): one thread, each value's bits independent of the others (so
    row-invariant by construction), within ~1e-7 |x| of the exact value as torch's is;
    torch's erf GELU wakes a second OpenMP thread even for one token, which cost more
    than the GELU itself between the matmul kernels. Elsewhere torch's, row-invariant."""
    if native is None or x.device.type != "cpu" or x.requires_grad or not x.dtype.is_floating_point:
        return _torch_gelu(x)
    xf = x.to(torch.float32).contiguous()
    y = torch.empty_like(xf)
    native.gelu(xf.data_ptr(), y.data_ptr(), xf.numel())
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def compiled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled fp32 row kernels (kernels_norm.h: RMSNorm, the gate, rotary)
    can take these tensors: CPU, fp32, no autograd graph to record (training keeps
    torch's ops)."""
    return (
        native is not None
        and hasattr(native, "rotary")  # an extension built before these kernels lacks them
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad
            for t in tensors
        )
    )


def silu_mul(g: torch.Tensor, u: torch.Tensor, torch_ops: bool = False) -> torch.Tensor:
    """silu(g) * u, SwiGLU's gate: in one pass on the calling thread (kernels_norm.h)
    for CPU fp32 outside autograd, each value's bits its own; elsewhere, or with
    torch_ops (torch's bits: BitNet rounds the result to int8 next), silu(g) * u."""
    if torch_ops or not (compiled(g, u) and g.shape == u.shape):
        return silu(g) * u
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    native.silu_gate(g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel())
    return y


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, torch_ops: bool = False
) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, as transformers'
    LlamaRMSNorm: in one pass per row on the calling thread (kernels_norm.h) for CPU
    fp32 x and weight outside autograd; elsewhere, or with torch_ops, torch's ops
    (normalized in fp32, rounded back to x's dtype, then scaled: transformers' bits)."""
    if torch_ops or not (
        compiled(x, weight) and weight.shape == x.shape[-1:] and weight.is_contiguous()
    ):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    native.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps)
    return y
