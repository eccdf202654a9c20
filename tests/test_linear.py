"""linear.Linear: narrow weights with fp32 compute, both paths, bias added after; the
row-invariant kernel and batch_invariant()."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import falconet
from falconet.nn import linear
from falconet.nn.linear import (
    DECODE_ROWS,
    PREFILL_ROWS,
    TILE_BYTES,
    Linear,
    batch_invariant,
    batch_invariant_active,
    row_invariant_linear,
)

needs_kernel = pytest.mark.skipif(
    linear.native is None,
    reason="compiled kernels not built (python setup.py build_ext --inplace)",
)


@pytest.fixture
def pytorch_only(monkeypatch):
    """Linear as it runs where the compiled extension is missing."""
    monkeypatch.setattr(linear, "native", None)


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


def test_decode_rows_run_in_the_weight_dtype(pytorch_only):
    lin = make(256, 384, torch.bfloat16)
    x = torch.randn(1, 1, 256)
    ref = F.linear(x.bfloat16(), lin.weight).float() + lin.bias
    assert torch.equal(lin(x), ref)


@pytest.mark.parametrize("rows", [5, DECODE_ROWS + 1])
def test_same_dtype_is_plain_linear_with_unfused_bias(pytorch_only, rows):
    lin = make(64, 32, torch.float32)
    x = torch.randn(rows, 64)
    assert torch.equal(lin(x), (x @ lin.weight.T) + lin.bias)


def test_no_bias():
    lin = make(64, 32, torch.bfloat16, bias=False)
    assert lin.bias is None
    x = torch.randn(20, 64)
    ref = (x.bfloat16().float() @ lin.weight.float().T).bfloat16().float()
    assert torch.allclose(lin(x), ref, rtol=1e-2, atol=1e-3)


# ---- the row-invariant kernel and batch_invariant() ---------------------------------


def assert_same_sum_rounded(
    ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor
) -> None:
    """ours and ref: x @ w.T in fp32, each summed in its own order, rounded to w's dtype.
    They are at most one unit in the last place of that dtype apart, plus how far apart
    the two fp32 sums can be (2K * 2^-24 * sum |x*w|; it shows only for outputs near 0,
    where cancellation leaves few significant bits), and nearly all are equal."""
    assert torch.equal(ours, ours.to(w.dtype).float())  # rounded to the weight dtype
    fraction_bits = {torch.bfloat16: 7, torch.float16: 10}[w.dtype]
    xr = x.to(w.dtype).double()
    sums_apart = 2 * x.shape[-1] * 2**-24 * (xr.abs() @ w.double().abs().T)
    ulp = ref.double().abs() * 2**-fraction_bits + 2**-24  # 2^-24: fp16's subnormal step
    assert ((ours.double() - ref.double()).abs() <= ulp + sums_apart).all()
    assert (ours != ref).double().mean() < 0.05


KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_COUNTS = [*range(1, 41), 100]


def assert_rows_invariant(lin: Linear, x: torch.Tensor) -> None:
    """Every prefix of x (M rows for M in ROW_COUNTS) gives each row its bits alone."""
    alone = torch.cat([lin(x[i : i + 1].clone()) for i in range(len(x))])
    for m in ROW_COUNTS:
        assert torch.equal(lin(x[:m]), alone[:m]), f"{m} rows"
    # leading dims are flattened into rows: (B, T, K) as (B*T, K)
    assert torch.equal(lin(x.view(4, 25, -1)), alone.view(4, 25, -1))


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("in_f, out_f", [(37, 35), (300, 301), (64, 7)])
def test_kernel_gives_each_row_its_bits_alone(dtype, in_f, out_f):
    # K not a multiple of 8 (a masked tail), N odd (edge tiles of 1 and 2 weight rows)
    lin = make(in_f, out_f, dtype)
    x = torch.randn(100, in_f)
    with batch_invariant():
        assert_rows_invariant(lin, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_without_the_extension_is_row_invariant(pytorch_only, dtype):
    lin = make(37, 35, dtype)
    x = torch.randn(100, 37)
    with batch_invariant():
        assert_rows_invariant(lin, x)
        rows = lin(x)
    # each row runs the usual path alone (a 1-row call: GEMV) on an aligned copy: MKL's
    # fp32 GEMV sums a row at byte offset 444 (x[3:4]) differently
    assert torch.equal(rows[3], lin(x[3:4].clone())[0])


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_thread_count_does_not_change_bits(dtype):
    lin = make(300, 301, dtype)
    x = torch.randn(9, 300)  # enough multiply-adds that the kernel does use its threads
    ref = row_invariant_linear(x, lin.weight, threads=1)
    for threads in (2, 3, 4, 7):
        assert torch.equal(row_invariant_linear(x, lin.weight, threads=threads), ref)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with batch_invariant():
            one = lin(x)
    finally:
        torch.set_num_threads(before)
    with batch_invariant():
        assert torch.equal(lin(x), one)


@needs_kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_portable_path_gives_the_avx2_bits(dtype):
    native = linear.native
    try:
        native.set_simd("avx2")
    except ValueError:
        pytest.skip("no AVX2 on this CPU")
    lin = make(300, 35, dtype)
    x = torch.randn(13, 300)
    fast = row_invariant_linear(x, lin.weight)
    native.set_simd("portable")
    try:
        assert torch.equal(row_invariant_linear(x, lin.weight), fast)
    finally:
        native.set_simd("avx2")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 20])  # the PyTorch GEMV, and the tiled upcast
def test_kernel_is_within_rounding_of_the_pytorch_path(rows):
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(1))
    w = make(300, 301, torch.float32).weight
    ref = x.double() @ w.double().T
    ours = row_invariant_linear(x, w)
    # fp32 rounding error relative to the sum of |products| (cancellation makes the plain
    # relative error of a small output large in either order)
    scale = x.double().abs() @ w.double().abs().T
    assert ((ours.double() - ref).abs() / scale).max() < 1e-6
    assert torch.allclose(ours, F.linear(x, w), rtol=1e-5, atol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        w = make(300, 301, dtype).weight
        assert_same_sum_rounded(row_invariant_linear(x, w), linear._linear(x, w), x, w)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_take_the_kernel_by_default(dtype):
    lin = make(300, 35, dtype)
    x = torch.randn(DECODE_ROWS, 300)
    assert not batch_invariant_active()
    assert torch.equal(lin(x), row_invariant_linear(x, lin.weight) + lin.bias)
    assert torch.equal(lin(x[:1]), lin(x)[:1])


@needs_kernel
def test_kernel_refuses_what_it_cannot_run():
    w = torch.randn(35, 300)
    with pytest.raises(ValueError, match="row_invariant_linear takes"):
        row_invariant_linear(torch.randn(2, 299), w)
    with pytest.raises(ValueError, match="row_invariant_linear takes"):
        row_invariant_linear(torch.randn(2, 300, dtype=torch.float64), w)


def test_kernel_skips_what_it_cannot_run():
    w = torch.randn(35, 300)
    assert not linear.kernel_applies(torch.randn(2, 300, dtype=torch.float64), w)
    assert not linear.kernel_applies(torch.randn(2, 299), w)
    assert not linear.kernel_applies(torch.randn(2, 300, requires_grad=True), w)
    with torch.no_grad():
        assert linear.kernel_applies(torch.randn(2, 300, requires_grad=True), w) == (
            linear.native is not None
        )


def test_batch_invariant_is_scoped_to_the_block_and_thread():
    assert not batch_invariant_active()
    seen = []
    with batch_invariant():
        with batch_invariant():
            assert batch_invariant_active()
        assert batch_invariant_active()
        other = threading.Thread(target=lambda: seen.append(batch_invariant_active()))
        other.start()
        other.join()
    assert seen == [False] and not batch_invariant_active()
    with pytest.raises(KeyError), batch_invariant():
        raise KeyError
    assert not batch_invariant_active()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "row-by-row"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["rw", "7b"])
@pytest.mark.parametrize("tokens", [5, 20])  # fp32, 5: without the block, 10 rows != 5 rows
def test_model_rows_equal_each_row_alone(
    hf_checkpoints, monkeypatch, variant, dtype, tokens, kernel
):
    if not kernel:
        monkeypatch.setattr(linear, "native", None)
    elif linear.native is None:
        pytest.skip("compiled kernels not built (python setup.py build_ext --inplace)")
    llm = falconet.load(hf_checkpoints[variant][1], dtype=dtype)
    ids = torch.randint(0, 400, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), batch_invariant():
        both = llm.model(ids)
        alone = [llm.model(ids[i : i + 1]) for i in range(2)]
    for i in range(2):
        assert torch.equal(both[i], alone[i][0])
