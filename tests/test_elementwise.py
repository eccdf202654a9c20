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


needs_kernel = pytest.mark.skipif(elementwise.native is None, reason="compiled kernels not built")


@needs_kernel
def test_compiled_gelu_is_the_exact_gelu_within_fp32_rounding():
    """The erf GELU (kernels_activation.h) against float64: absolute error within a few
    1e-7 (erf's bound times |x|/2), as close as torch's own fp32 GELU, signed zeros and
    infinities kept."""
    x = torch.cat([torch.randn(20000) * 4, torch.linspace(-12, 12, 2401)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, float("inf")])])
    y = elementwise.gelu(x)
    want = F.gelu(x.double())
    finite = torch.isfinite(x)
    err = (y.double() - want)[finite].abs()
    assert (err <= 2e-7 * x.double()[finite].abs().clamp_min(1.0)).all()
    assert err.max() < 2 * (F.gelu(x).double() - want)[finite].abs().max() + 1e-7
    assert torch.equal(y[-7:-5].view(torch.int32), torch.tensor([0.0, -0.0]).view(torch.int32))
    assert y[-1] == float("inf") and y[-3] == 1e4 and y[-2] == 0.0


@needs_kernel
def test_compiled_gelu_bits_do_not_depend_on_neighbours_or_path():
    """Each value takes the same operations in the vector body and the masked tail, and
    the portable path does them with C's fmaf: one value's bits whatever shares the call
    (a decode row, a prompt, any offset) and whichever path runs."""
    x = torch.randn(7, 8203) * 3
    whole = elementwise.gelu(x)
    for lo, hi in ((0, 1), (3, 7)):
        assert torch.equal(elementwise.gelu(x[lo:hi]), whole[lo:hi])
    assert torch.equal(elementwise.gelu(x[2, 5:18]), whole[2, 5:18])  # a 13-value tail
    native = elementwise.native
    try:
        native.set_simd("avx2")
    except ValueError:
        pytest.skip("no AVX2 on this CPU")
    native.set_simd("portable")
    try:
        assert torch.equal(elementwise.gelu(x), whole)
    finally:
        native.set_simd("avx2")
    assert elementwise.gelu(x.bfloat16()).dtype == torch.bfloat16
    g = torch.randn(4, requires_grad=True)
    elementwise.gelu(g).sum().backward()  # training takes torch's op: autograd works
    assert g.grad is not None


@needs_kernel
@pytest.mark.parametrize("width", [1, 7, 8, 37, 2048, 8203])
def test_compiled_rms_norm_is_llama_rms_norm_and_row_invariant(width):
    """RMSNorm in one pass (kernels_norm.h): within fp32 rounding of float64's
    w * x / sqrt(mean(x^2) + eps) and of torch's fp32 ops (which sum in another order);
    a row's bits whatever rows share the call; the AVX2 and portable paths the same bits."""
    from falconet.nn.norms import RMSNorm
    from tests.conftest import on_both_simd_paths

    torch.manual_seed(width)
    x = torch.randn(2, 5, width) * 3
    x[1, 2] = 0.0  # a zero row: eps alone
    norm = RMSNorm(width, 1e-6, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width))
    y = norm(x)
    want = (
        norm.weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    )
    assert ((y.double() - want).abs() <= 4e-7 * want.abs().clamp_min(1e-3)).all()
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(y, norm.weight * h, rtol=1e-6, atol=1e-7)  # torch's own fp32 ops
    assert torch.equal(y[1, 2], torch.zeros(width))
    for lo, hi in ((0, 1), (1, 2)):
        assert torch.equal(norm(x[lo:hi]), y[lo:hi])
    assert torch.equal(norm(x[1, 3:4].clone()), y[1, 3:4])
    fast, portable = on_both_simd_paths(elementwise.native, lambda: norm(x))
    assert torch.equal(fast, y) and torch.equal(portable, y)
    w = norm.weight.detach().clone().requires_grad_()  # training: torch's ops, autograd
    trained = elementwise.rms_norm(x, w, 1e-6)
    assert torch.equal(trained, norm.weight * h) and trained.grad_fn is not None
    assert torch.equal(elementwise.rms_norm(x, norm.weight, 1e-6, torch_ops=True), norm.weight * h)


@needs_kernel
@pytest.mark.parametrize("width", [1, 13, 64, 8192, 8203])
def test_compiled_swiglu_gate_is_silu_times_up(width):
    """silu(g) * u in one pass: within a few fp32 ulps of float64's, the far tails as
    silu has them (to below 1e-30 where exp overflows), a value's bits independent of its neighbours and of the
    path (AVX2 or portable)."""
    from tests.conftest import on_both_simd_paths

    torch.manual_seed(width)
    g, u = torch.randn(3, width) * 6, torch.randn(3, width)
    g[0, 0], u[0, 0] = -200.0, 1.0  # exp(200) overflows fp32 (torch: -0; here exp2 clamps)
    if width > 1:
        g[0, 1], u[0, 1] = 200.0, 2.0  # silu(200) = 200
    y = elementwise.silu_mul(g, u)
    want = F.silu(g.double()) * u.double()
    assert ((y.double() - want).abs() <= 1e-6 * want.abs() + 1e-12).all()
    assert abs(y[0, 0]) < 1e-30 and (width == 1 or y[0, 1] == 400.0)
    assert torch.equal(elementwise.silu_mul(g[1:2].clone(), u[1:2].clone()), y[1:2])
    fast, portable = on_both_simd_paths(elementwise.native, lambda: elementwise.silu_mul(g, u))
    assert torch.equal(fast, y) and torch.equal(portable, y)
    assert elementwise.silu_mul(g.bfloat16(), u.bfloat16()).dtype == torch.bfloat16
    gg = g.clone().requires_grad_()
    elementwise.silu_mul(gg, u).sum().backward()  # training: torch's ops, autograd
    assert gg.grad is not None


@needs_kernel
@pytest.mark.parametrize("B,H,T,D,cos_rows,fused", [(1, 8, 1, 256, 1, False), (3, 4, 5, 64, 3, False),
                                                    (2, 3, 7, 20, 1, False), (2, 1, 4, 16, 2, False),
                                                    (2, 6, 3, 32, 1, True)])  # fmt: skip
def test_compiled_rotary_is_the_torch_form_bit_for_bit(B, H, T, D, cos_rows, fused):
    """apply_rotary's compiled pass rounds the two products and their sum as torch's ops
    do: the same bits and layout, for heads viewed out of a (B, T, H, D) projection (a
    layout the engine's batch-invariance depends on), cos shared by
    the batch or per sequence, D/2 a multiple of 8 (vector path) or not; AVX2 and
    portable alike; autograd and other dtypes take torch's ops."""
    from falconet.nn.attention import _rotary_compiled, apply_rotary
    from tests.conftest import on_both_simd_paths

    torch.manual_seed(D)
    # fused: heads split out of a wider projection (Falcon's qk), so not dense
    x = torch.randn(B, T, H + 2 * fused, D)[:, :, :H].transpose(1, 2)
    cos, ssin = torch.randn(cos_rows, 1, T, D), torch.randn(cos_rows, 1, T, D)
    want = x * cos + x.roll(D // 2, -1) * ssin
    assert _rotary_compiled(x, cos, ssin)
    fast, portable = on_both_simd_paths(elementwise.native, lambda: apply_rotary(x, cos, ssin))
    assert torch.equal(fast, want) and torch.equal(portable, want)
    layout = [(st, n) for st, n in zip(fast.stride(), fast.shape, strict=True) if n > 1]
    assert layout == [(st, n) for st, n in zip(want.stride(), want.shape, strict=True) if n > 1]
    xg = x.clone().requires_grad_()
    assert not _rotary_compiled(xg, cos, ssin)
    apply_rotary(xg, cos, ssin).sum().backward()
    assert xg.grad is not None
    assert apply_rotary(x.double(), cos.double(), ssin.double()).dtype == torch.float64
