"""Row-invariant elementwise activations (falconet/nn/elementwise.py): inside
batch_invariant() a row's activations are the same bits whatever rows share the call --
the widths of tiny test models and wider than one slice -- and still the activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconet.nn import elementwise
from falconet.nn.linear import batch_invariant


@pytest.mark.parametrize("width", [5, 24, 56, 64, 100, 40000])
@pytest.mark.parametrize("name", ["silu", "softplus"])
def test_a_row_is_the_same_bits_in_any_batch(width, name):
    fn, ref = getattr(elementwise, name), getattr(F, name)
    torch.manual_seed(width)
    x = torch.randn(1, 19, width) * 4
    with batch_invariant():
        together = fn(x)
        for lo, hi in ((0, 1), (3, 19), (18, 19), (5, 12)):
            assert torch.equal(fn(x[:, lo:hi].contiguous()), together[:, lo:hi])
    assert torch.allclose(together, ref(x), rtol=1e-6, atol=1e-7)
    assert torch.equal(fn(x), ref(x))  # outside batch_invariant(): PyTorch's own


def test_autograd_and_dtypes_pass_through():
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    with batch_invariant():
        assert elementwise.silu(x).dtype == torch.bfloat16
        g = torch.randn(2, 7, requires_grad=True)
        elementwise.silu(g).sum().backward()  # the plain op: autograd works
    assert g.grad is not None and g.grad.shape == (2, 7)
