"""linear.Linear: narrow weights with fp32 compute, both paths, bias added after."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconet.linear import PREFILL_ROWS, TILE_BYTES, Linear


def make(in_f: int, out_f: int, dtype: torch.dtype, bias: bool = True) -> Linear:
    g = torch.Generator().manual_seed(0)
    lin = Linear(in_f, out_f, bias, dtype, torch.float32)
    lin.weight.data = torch.randn(out_f, in_f, generator=g).to(dtype)
    if bias:
        lin.bias.data = torch.randn(out_f, generator=g)
    return lin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_rows_use_fp32_math_on_the_narrow_weight(dtype):
    # out_features spans several tiles and ends in a partial one
    in_f = 512
    out_f = 3 * (TILE_BYTES // (in_f * 4)) + 5
    lin = make(in_f, out_f, dtype)
    x = torch.randn(2, PREFILL_ROWS + 3, in_f)
    rounded = x.to(dtype).float()
    ref = F.linear(rounded, lin.weight.float()).to(dtype).float() + lin.bias
    out = lin(x)
    assert out.dtype == torch.float32 and out.shape == (2, PREFILL_ROWS + 3, out_f)
    # fp32 accumulation order may flip a rounded output in rare elements
    assert (out != ref).float().mean() < 1e-3
    assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_row_gives_the_same_result_alone_or_with_many_rows(dtype):
    lin = make(512, 1024, dtype)
    x = torch.randn(PREFILL_ROWS * 2, 512)
    many = lin(x)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(len(x))])
    assert (many != alone).float().mean() < 5e-3  # fp16 keeps 3 more bits: more flips
    assert torch.allclose(many, alone, rtol=1e-2, atol=1e-2)


def test_decode_rows_run_in_the_weight_dtype():
    lin = make(256, 384, torch.bfloat16)
    x = torch.randn(1, 1, 256)
    ref = F.linear(x.bfloat16(), lin.weight).float() + lin.bias
    assert torch.equal(lin(x), ref)


def test_same_dtype_is_plain_linear_with_unfused_bias():
    lin = make(64, 32, torch.float32)
    x = torch.randn(5, 64)
    assert torch.equal(lin(x), (x @ lin.weight.T) + lin.bias)


def test_no_bias():
    lin = make(64, 32, torch.bfloat16, bias=False)
    assert lin.bias is None
    x = torch.randn(20, 64)
    ref = (x.bfloat16().float() @ lin.weight.float().T).bfloat16().float()
    assert torch.allclose(lin(x), ref, rtol=1e-2, atol=1e-3)
