"""Which implementation runs a state space scan: the compiled CPU kernel, Triton on CUDA,
or PyTorch. Shared by Mamba-1 (selective_scan.py) and Mamba-2 (ssd.py).

The choice depends only on where the tensors live (and autograd), never on their sizes,
so every call of one model -- prefill, chunks, decode -- takes the same path and gives
the same bits however a prompt is cut into calls.
"""

from __future__ import annotations

import torch


def _no_grad(tensors: tuple[torch.Tensor, ...]) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def native_applies(available: bool, *tensors: torch.Tensor) -> bool:
    """The compiled kernel (when `available`: built, with that entry point) serves CPU
    tensors outside autograd."""
    return available and all(t.device.type == "cpu" for t in tensors) and _no_grad(tensors)


def triton_applies(*tensors: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA tensors outside autograd when triton is installed
    (imported only then: CPU runs never load it)."""
    if not all(t.is_cuda for t in tensors) or not _no_grad(tensors):
        return False
    from falconet.nn import triton_scan

    return triton_scan.available()
