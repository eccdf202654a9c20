"""The K-quant kernels (falconet/quant/kernels_kquants.h): Q2_K..Q6_K weight blocks times
activations rounded to Q8_K, on both compiled paths, against numpy.

Bounds, with u = 2**-24 (float32's unit roundoff) and nb super-blocks per row:

- Against the float reference -- the dequantized weights (GGML's dequantize_row_*, in
  float64) times the dequantized Q8_K activations dx * q -- a row's result differs by at
  most (nb + 8) * u * S, S = sum_i (|a_i| + |c_i|) * |dx q_i| where w_i = a_i + c_i is
  a weight's scale term d*s*(u-o) and min term -dmin*m. The kernel's integer sums are
  exact; per super-block it rounds d*dx, the integer to float, the product (each term),
  and the subtraction (4u), then nb additions (nb*u); the float32 weights of the
  reference themselves are within u of a + c (1u). 3u of slack covers second-order terms.
- Against the unquantized activations, the rounding of x to Q8_K adds at most
  sum_i |w_i| * |dx| * (1/2 + 2**-16): |x - dx*q| is half a step, plus the rounding of
  x * (-127/max) in float32. This is the error llama.cpp's own K-quant dot products have
  (the same Q8_K rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from falconet.quant import QuantError, get_format, kernels
from falconet.quant.linear import QuantLinear, QuantTensor

KQUANTS = sorted(kernels.KQUANT_TYPES)
U = 2.0**-24
pytestmark = pytest.mark.skipif(kernels.native is None, reason="compiled kernels not built")


def simd_paths() -> list[str]:
    if kernels.native is None:
        return []
    before = kernels.native.simd()
    try:
        kernels.native.set_simd("avx2")
        return ["portable", "avx2"]
    except ValueError:
        return ["portable"]
    finally:
        kernels.native.set_simd(before)


@pytest.fixture(params=["avx2", "portable"])
def simd(request):
    if request.param not in simd_paths():
        pytest.skip(f"{request.param} kernels unavailable here")
    before = kernels.native.simd()
    kernels.native.set_simd(request.param)
    yield request.param
    kernels.native.set_simd(before)


def kquant_blocks(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant rows [rows, row_bytes]: every quant and sub-block scale random, the
    fp16 super-block scales of realistic size (a zero scale in the first block)."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    n = rows * cols // fmt.block_size
    raw = rng.integers(0, 256, (n, fmt.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1).view(fmt.layout)
    for field in ("d", "dmin"):
        if field in fmt.layout.names:
            blocks[field] = (rng.standard_normal(n) * 0.01).astype(np.float16)
            blocks[field][0] = 0.0
    return raw.reshape(rows, -1)


def with_fields(raw: np.ndarray, name: str, **zeroed: bool) -> np.ndarray:
    """A copy of the blocks with the named fp16 fields set to zero."""
    fmt = get_format(name)
    out = raw.copy()
    blocks = out.reshape(-1).view(fmt.layout)
    for field in zeroed:
        if field in fmt.layout.names:
            blocks[field] = 0.0
    return out


def activations(M: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 2, M).unsqueeze(1)
    x[0, :256] = 0.0  # an all-zero Q8_K block
    x[-1, 5] = -1e3  # a negative extreme: the scale's sign flips
    return x


def q8_K_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q8_K_ref in numpy float32: (d, qs, bsums) per 256 values."""
    blocks = x.astype(np.float32).reshape(-1, 256)
    first = np.abs(blocks).argmax(axis=1)  # the first value of largest magnitude
    top = blocks[np.arange(len(blocks)), first]
    with np.errstate(divide="ignore"):
        iscale = np.where(top != 0, np.float32(-127.0) / top, np.float32(0)).astype(np.float32)
    qs = np.minimum(127, np.rint(iscale[:, None] * blocks)).astype(np.int8)  # ties to even
    with np.errstate(divide="ignore"):
        d = np.where(top != 0, np.float32(1.0) / iscale, np.float32(0)).astype(np.float32)
    bsums = qs.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return d, qs, bsums


def test_q8_K_rounding_is_llama_cpps(simd):
    x = activations(5, 1024, seed=1)
    x[2, 300] = 0.5 * x[2, 256:512].abs().max()  # a value near half of the extreme
    q = kernels.quantize_q8_K(x)
    d, qs, bsums = q8_K_reference(x.numpy())
    assert np.array_equal(q["d"].reshape(-1).view(np.uint32), d.view(np.uint32))
    assert np.array_equal(q["qs"].reshape(-1, 256), qs)
    assert np.array_equal(q["bsums"].reshape(-1, 16), bsums)
    assert q["d"][0, 0] == 0 and not q["qs"][0, 0].any()  # the zero block
    assert q["qs"].min() >= -127


def dequantized_activations(x: torch.Tensor) -> np.ndarray:
    q = kernels.quantize_q8_K(x)
    return (q["d"][:, :, None].astype(np.float64) * q["qs"]).reshape(x.shape), q["d"]


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_products_equal_the_float_reference(name, simd):
    fmt = get_format(name)
    N, K, M = 40, 768, 11  # 40 rows: 2.5 row chunks; 11 activation rows: 2 row groups
    nb = K // 256
    raw = kquant_blocks(name, N, K, seed=fmt.ggml_type)
    x = activations(M, K, seed=fmt.ggml_type)
    y = kernels.kquant_linear(x, fmt, torch.from_numpy(raw), N).double().numpy()

    w = fmt.dequantize(raw, (N, K)).astype(np.float64)
    scale_part = fmt.dequantize(with_fields(raw, name, dmin=True), (N, K)).astype(np.float64)
    min_part = fmt.dequantize(with_fields(raw, name, d=True), (N, K)).astype(np.float64)
    xd, dx = dequantized_activations(x)
    ref = xd @ w.T
    S = np.abs(xd) @ (np.abs(scale_part) + np.abs(min_part)).T
    assert np.all(np.abs(y - ref) <= (nb + 8) * U * S)

    # against the float activations: Q8_K's half step per value on top
    step = np.repeat(np.abs(dx.astype(np.float64)), 256, axis=1)  # (M, K): |dx| per value
    act = (step * (0.5 + 2.0**-16)) @ np.abs(w).T
    exact = x.double().numpy() @ w.T
    assert np.all(np.abs(y - exact) <= act + (nb + 8) * U * S)


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_rows_are_bit_identical_across_batches_paths_and_threads(name):
    fmt = get_format(name)
    N, K = 24, 512
    raw = torch.from_numpy(kquant_blocks(name, N, K, seed=7))
    x = activations(13, K, seed=7)
    results = []
    before, threads = kernels.native.simd(), torch.get_num_threads()
    try:
        for path in simd_paths():
            kernels.native.set_simd(path)
            for t in (1, 2):
                torch.set_num_threads(t)
                batch = kernels.kquant_linear(x, fmt, raw, N)
                alone = torch.cat(
                    [kernels.kquant_linear(x[i : i + 1], fmt, raw, N) for i in range(13)]
                )
                assert torch.equal(batch, alone)
                results.append(batch)
    finally:
        kernels.native.set_simd(before)
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_quant_linear_runs_kquant_blocks_in_place():
    name, N, K = "q3_k", 16, 512  # a K-quant without an x8 layout
    fmt = get_format(name)
    blocks = torch.from_numpy(kquant_blocks(name, N, K, seed=3))
    bias = torch.randn(N)
    layer = QuantLinear(QuantTensor(fmt, blocks, (N, K)), bias)
    x = activations(3, K, seed=3).view(3, 1, K)
    y = layer(x)
    assert torch.equal(y, kernels.kquant_linear(x, fmt, blocks, N) + bias)
    assert layer.weight_blocks.data_ptr() == blocks.data_ptr() and layer.layout == "ggml"
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(layer.weight.data, blocks)


def int8_dots() -> list[str]:
    before = kernels.native.int8_dot()
    try:
        kernels.native.set_int8_dot("vnni")
        return ["maddubs", "vnni"]
    except ValueError:
        return ["maddubs"]
    finally:
        kernels.native.set_int8_dot(before)


@pytest.mark.skipif(
    not kernels.x8_eligible(get_format("q4_k"), 8), reason="K-quant x8 tiles need the AVX2 kernels"
)
@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_kquant_x8_tiles_give_the_row_kernels_bits(name):
    """A Q4_K / Q5_K / Q6_K layer repacks to x8 tiles at its first CPU forward and then computes
    exactly what the row-major kernel computes on the file's blocks: every batch size,
    both int8 product paths, any thread count; the tiles turn back into the same blocks."""
    N, K = 24, 768
    fmt = get_format(name)
    blocks = torch.from_numpy(kquant_blocks(name, N, K, seed=11))
    x = activations(13, K, seed=11)
    expected = kernels.kquant_linear(x, fmt, blocks, N)  # row-major, GGUF blocks
    layer = QuantLinear(QuantTensor(fmt, blocks.clone(), (N, K)))
    assert torch.equal(layer(x[:1]), expected[:1])
    assert layer.layout == "x8" and not torch.equal(layer.weight_blocks, blocks)
    before, threads = kernels.native.int8_dot(), torch.get_num_threads()
    try:
        for dot in int8_dots():
            kernels.native.set_int8_dot(dot)
            for t in (1, 2):
                torch.set_num_threads(t)
                assert torch.equal(layer(x), expected)
                for M in (1, 2, 3, 5, 6, 7, 8, 9):
                    assert torch.equal(layer(x[:M]), expected[:M])
    finally:
        kernels.native.set_int8_dot(before)
        torch.set_num_threads(threads)
    assert torch.equal(layer.weight.data, blocks)  # x8 -> GGML rows: the file's bytes
    tiles = kernels.repack(fmt, blocks, K, to_x8=True)
    assert tiles.shape == blocks.shape
    assert torch.equal(kernels.repack(fmt, tiles, K, to_x8=False), blocks)
    code = kernels.KQUANT_TYPES[name]
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.native.kq_gemm_x8(code, tiles.data_ptr(), 20, K, x.data_ptr(), 1, x.data_ptr(), 1)
    with pytest.raises(ValueError, match="Q4_K, Q5_K or Q6_K"):
        kernels.native.kq_gemm_x8(11, tiles.data_ptr(), N, K, x.data_ptr(), 1, x.data_ptr(), 1)
    with pytest.raises(ValueError, match="Q4_K \\(12\\), Q5_K \\(13\\) or Q6_K"):
        kernels.native.kq_repack(11, tiles.data_ptr(), x.data_ptr(), N, K, False)


def test_kquant_kernel_refuses_bad_arguments():
    fmt, blocks = get_format("q6_k"), torch.from_numpy(kquant_blocks("q6_k", 4, 256, seed=0))
    x = torch.zeros(1, 256)
    with pytest.raises(ValueError, match="K-quant types"):
        kernels.native.kq_gemm(8, blocks.data_ptr(), 4, 256, x.data_ptr(), 1, x.data_ptr(), 1)
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.native.kq_gemm(14, blocks.data_ptr(), 4, 128, x.data_ptr(), 1, x.data_ptr(), 1)
    with pytest.raises(ValueError, match="contiguous uint8 blocks"):
        kernels.kquant_linear(x, fmt, blocks[:2], 4)
    with pytest.raises(QuantError, match="not a multiple of the block size 256"):
        QuantTensor(fmt, blocks, (4, 300))
