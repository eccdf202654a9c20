"""falconet.quant formats against gguf-py's `gguf.quants` (the reference quantizers in
Python): quantized bytes equal byte for byte, dequantized floats equal bit for bit."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import pytest

from falconet.errors import FalconetError
from falconet.quant import FORMATS, QuantError, dequantize, formats, get_format, quantize
from tests.conftest import build_hf_model

gguf = pytest.importorskip("gguf")

FLOATS = ["f32", "f16", "bf16"]
BLOCK_QUANTS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
QUANTIZABLE = FLOATS + BLOCK_QUANTS
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# The reference's `(int8_t)` of Inf/NaN is hardware-defined; gguf-py on x86 gives 0.
X86 = platform.machine().lower() in ("x86_64", "amd64")


def ggml_type(name: str):
    return gguf.GGMLQuantizationType(FORMATS[name].ggml_type)


def reference_bytes(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, ggml_type(name))
    return np.ascontiguousarray(ref).view(np.uint8)  # f16/f32 come back as float arrays


def reference_values(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, ggml_type(name))


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def check_against_reference(x: np.ndarray, name: str) -> np.ndarray:
    fmt = FORMATS[name]
    raw = fmt.quantize(x)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, reference_bytes(x, name))
    assert_bits_equal(fmt.dequantize(raw, x.shape), reference_values(raw, name).reshape(x.shape))
    return raw


def fields(raw: np.ndarray, name: str) -> np.ndarray:
    """Structured view of a [..., bytes] array, one record per block."""
    return np.ascontiguousarray(raw).reshape(-1).view(FORMATS[name].layout)


# --- registry --------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZABLE + K_QUANTS)
def test_registry_matches_gguf_types_and_sizes(name):
    fmt = FORMATS[name]
    qtype = gguf.GGMLQuantizationType[name.upper()]
    assert fmt.name == name and fmt.ggml_type == qtype
    assert FORMATS[qtype] is fmt and FORMATS[int(qtype)] is fmt
    assert get_format(name.upper()) is fmt and get_format(qtype) is fmt
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    assert fmt.can_quantize  # the K-quants through the compiled quantizers


def test_unknown_type_is_a_quant_error():
    with pytest.raises(QuantError, match="iq2_xxs.*falconet reads f32, f16"):
        get_format("iq2_xxs")
    with pytest.raises(QuantError, match="999"):
        get_format(999)
    assert issubclass(QuantError, FalconetError)


# --- byte-exact against the reference ---------------------------------------------------


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 0.02, 1.0, 300.0])
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_random_normal_matches_reference(name, scale):
    # 1e-7: every fp16 scale underflows to 0; 1e-4: subnormal fp16 scales
    rng = np.random.default_rng(FORMATS[name].ggml_type)
    x = (rng.standard_normal((48, 256)) * scale).astype(np.float32)
    check_against_reference(x, name)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_heavy_tailed_rows_match_reference(name):
    # outliers dominate their blocks, as in real LLM weights
    rng = np.random.default_rng(7)
    x = (rng.standard_t(df=2, size=(3, 5, 320)) * 0.02).astype(np.float32)
    check_against_reference(x, name)


@pytest.fixture(scope="module")
def falcon_weights() -> list[np.ndarray]:
    model = build_hf_model("40b")
    return [p.detach().numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_tiny_falcon_weights_match_reference(name, falcon_weights):
    for w in falcon_weights:  # matrices, norms and biases: every last dim is a multiple of 32
        check_against_reference(w, name)


def edge_blocks() -> np.ndarray:
    """[n, 32] blocks covering the reference's corner cases."""
    rng = np.random.default_rng(3)
    blocks = []

    def one_nonzero(j: int, v: float) -> np.ndarray:
        b = np.zeros(32, np.float32)
        b[j] = v
        return b

    blocks.append(np.zeros(32, np.float32))
    blocks += [one_nonzero(0, 1.5), one_nonzero(31, -1.5), one_nonzero(16, 3e-3)]
    neg = (rng.standard_normal(32) * 0.1).astype(np.float32)
    neg[7] = -2.0  # the max-magnitude value is negative
    blocks.append(neg)
    for a, b in ((1.25, -1.25), (-1.25, 1.25)):  # ties in max magnitude, either sign first
        t = (rng.standard_normal(32) * 0.1).astype(np.float32)
        t[3], t[20] = a, b
        blocks.append(t)
    blocks.append(np.full(32, 0.75, np.float32))  # constant: q4_1's d is 0
    blocks.append(np.full(32, -0.75, np.float32))
    blocks.append(np.arange(-8, 8, 0.5, dtype=np.float32))  # q4_0 d = 1: halves round up
    blocks.append(np.r_[127.0, np.arange(-15.5, 15.5)].astype(np.float32))  # q8_0 d = 1: halves
    blocks.append((rng.standard_normal(32) * 1e-30).astype(np.float32))  # tiny, fp16 scale 0
    blocks.append(one_nonzero(0, 1e-30))
    sub = (rng.standard_normal(32) * 1e-40).astype(np.float32)  # subnormals beside a normal
    sub[5] = 1.0
    blocks.append(sub)
    blocks.append(one_nonzero(9, 2.0**-126))  # smallest normal float32
    blocks.append(np.float32(1e-45) * np.sign(rng.standard_normal(32)))  # d underflows to 0
    blocks.append((rng.standard_normal(32) * 1e-6).astype(np.float32))  # subnormal fp16 scale
    blocks.append((rng.standard_normal(32) * 1e4).astype(np.float32))  # large but in range
    return np.stack(blocks)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_edge_blocks_match_reference(name):
    check_against_reference(edge_blocks(), name)


# Per format: the values that pin the block's step to d, and the range of k for the
# rounding boundaries at (k + 1/2) * d (relative to the min for Q4_1/Q5_1).
BOUNDARIES = {"q8_0": ([127.0], -127, 126), "q4_0": ([-8.0], -8, 7), "q5_0": ([-16.0], -16, 15),
              "q4_1": ([0.0, 15.0], 0, 14), "q5_1": ([0.0, 31.0], 0, 30)}  # fmt: skip


@pytest.mark.parametrize("name", BLOCK_QUANTS)
def test_values_next_to_rounding_boundaries_match_reference(name):
    # Within a few ulps of a rounding flip, float64 intermediates, x/d instead of x*(1/d),
    # or round-half-even instead of the reference's rounding change the bytes.
    anchors, lo, hi = BOUNDARIES[name]
    rng = np.random.default_rng(29)
    n = 20_000
    d = rng.lognormal(-4, 2, (n, 1)).astype(np.float32)
    k = rng.integers(lo, hi, (n, 32)) + 0.5
    ulps = rng.integers(-4, 5, (n, 32)) * 2.0**-23
    x = (k * d * (1 + ulps)).astype(np.float32)
    x[:, : len(anchors)] = np.array(anchors, np.float32) * d
    check_against_reference(x, name)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_1", "q5_1"])
def test_signed_zero_blocks_follow_the_c_reference(name):
    # The C reference keeps max = +0.0 for an all-zero block (`if (amax < fabsf(v))`), so
    # Q4_0/Q5_0 store d = +0/-8 = -0.0; Q4_1/Q5_1 keep the first zero as min
    # (`if (v < min)`). gguf-py 0.19 takes the sign from the data instead; everything
    # else must still match it.
    x = np.zeros((3, 32), np.float32)
    x[0] = -0.0
    x[1, 0] = -0.0
    x[2, 1] = -0.0
    raw = FORMATS[name].quantize(x)
    expected = fields(reference_bytes(x, name).copy(), name)
    if name in ("q4_0", "q5_0"):
        expected["d"] = np.float16(-0.0)
    else:
        expected["m"] = np.array([-0.0, -0.0, 0.0], np.float16)
    np.testing.assert_array_equal(raw.reshape(-1), expected.view(np.uint8))
    assert_bits_equal(FORMATS[name].dequantize(raw, x.shape), reference_values(raw, name))


@pytest.mark.parametrize("name", BLOCK_QUANTS)
def test_scale_whose_inverse_overflows_stores_zero_quants(name):
    # All-subnormal blocks: d = amax/127 (or less) is so small that 1/d is Inf in float32.
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 32)) * 1e-40).astype(np.float32)
    x[3] = np.float32(1e-38) * np.sign(rng.standard_normal(32))  # just below the normal range
    raw = FORMATS[name].quantize(x)
    ours, ref = fields(raw, name), fields(reference_bytes(x, name), name)
    for field in FORMATS[name].layout.names:
        if field in ("qs", "qh"):
            assert not ours[field].any()
        else:  # scale and min: the same float32 arithmetic as the reference
            np.testing.assert_array_equal(ours[field].view(np.uint16), ref[field].view(np.uint16))
    if X86:
        np.testing.assert_array_equal(raw, reference_bytes(x, name))
    y = FORMATS[name].dequantize(raw, x.shape)
    assert_bits_equal(y, reference_values(raw, name))
    assert not y.any()


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_chunked_rows_match_reference(name, monkeypatch):
    monkeypatch.setattr(formats, "CHUNK_BLOCKS", 7)  # chunk edges fall inside rows
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    check_against_reference(x, name)


# --- K-quants: dequantize only ------------------------------------------------------------


def random_kquant_blocks(name: str, n: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 super-block scales of many magnitudes (gguf-py has
    no K-quant quantizer to make real ones)."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, fmt.type_size), dtype=np.uint8)
    raw[0], raw[1] = 0, 255  # every quant and scale at its minimum / maximum
    blocks = raw.reshape(-1).view(fmt.layout)
    for field in ("d", "dmin"):
        if field in fmt.layout.names:
            magnitude = rng.choice([0.0, 6e-8, 1e-5, 1e-3, 0.1, 10.0], n)  # 6e-8: subnormal fp16
            blocks[field] = (rng.standard_normal(n) * magnitude).astype(np.float16)
    blocks["d"][1] = 65504.0
    return raw


@pytest.mark.parametrize("name", K_QUANTS)
def test_kquant_blocks_dequantize_like_reference(name):
    fmt = FORMATS[name]
    raw = random_kquant_blocks(name, 600, seed=fmt.ggml_type)
    assert_bits_equal(fmt.dequantize_blocks(raw), reference_values(raw, name))
    rows = raw.reshape(6, 100 * fmt.type_size)  # 6 rows of 100 super-blocks
    shape = (6, 100 * fmt.block_size)
    assert_bits_equal(fmt.dequantize(rows, shape), reference_values(rows, name))
    assert_bits_equal(dequantize(rows, name, shape), reference_values(rows, name))


@pytest.mark.parametrize("name", K_QUANTS)
def test_kquants_are_written_block_by_block(name):
    """Rows quantize as their super-blocks do alone (tests/test_kquant_quantize.py holds
    the bytes against llama.cpp's), and zeros stay zeros."""
    pytest.importorskip(
        "falconet.quant._kernels", reason="K-quants are written by the compiled kernels"
    )
    fmt = FORMATS[name]
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    x[2] = 0
    rows = fmt.quantize(x)
    assert np.array_equal(rows.reshape(-1, fmt.type_size), fmt.quantize_blocks(x.reshape(-1, 256)))
    assert not fmt.dequantize(rows, x.shape)[2].any()


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_non_finite_input_names_count_and_first_position(name, bad):
    x = np.ones((4, 64), np.float32)
    x[3, 40] = bad
    x[2, 17] = bad
    with pytest.raises(
        QuantError, match=r"2 non-finite .* row 2, col 17 of a tensor of shape \(4, 64\)"
    ):
        FORMATS[name].quantize(x)
    y = np.ones((2, 3, 64), np.float32)
    y[1, 2, 5] = bad
    with pytest.raises(QuantError, match=r"1 non-finite .* row 5, col 5 "):
        FORMATS[name].quantize(y)
    block_size = FORMATS[name].block_size
    with pytest.raises(QuantError, match=r"1 non-finite"):
        FORMATS[name].quantize_blocks(y.reshape(-1, block_size))


def test_non_finite_counts_nan_and_inf_after_float32_conversion():
    x = np.zeros((2, 32))  # float64: 1e300 becomes Inf in float32
    x[0, 1], x[1, 2], x[1, 3] = 1e300, np.nan, np.nan
    with pytest.raises(QuantError, match=r"3 non-finite value\(s\) \(2 NaN, 1 Inf.* row 0, col 1"):
        quantize(x, "q8_0")


# A value that makes the fp16 scale (or min, or an f16/bf16 value) Inf in the reference.
OVERFLOW = {"f16": 7e4, "bf16": 3.4e38, "q8_0": 1e30, "q4_0": 1e30, "q4_1": 1e30, "q5_0": 1e30,
            "q5_1": 1e30}  # fmt: skip


@pytest.mark.parametrize("name", list(OVERFLOW))
def test_fp16_overflow_raises_where_the_reference_writes_inf(name):
    x = np.zeros((2, 64), np.float32)
    x[1, 37] = OVERFLOW[name]
    ref = fields(reference_bytes(x, name), name)
    if name == "bf16":  # raw bits: exponent all ones
        assert (ref["bits"][64 + 37] & 0x7F80) == 0x7F80
    else:
        assert np.isinf(ref["value" if name == "f16" else "d"]).any()
    where = "col 37" if FORMATS[name].block_size == 1 else "cols 32..63"
    with pytest.raises(QuantError, match=f"1 block\\(s\\) hold values too large.*row 1, {where}"):
        FORMATS[name].quantize(x)


def test_q4_1_min_overflow_raises():
    x = np.full((1, 32), 1e5, np.float32)  # d = 0 but m = 1e5 does not fit fp16
    with pytest.raises(QuantError, match="too large"):
        quantize(x, "q4_1")


# The largest block each format stores with finite fp16 fields, and the reference agrees.
LARGEST = {
    "f32": np.full(32, 3.4028235e38),
    "f16": np.full(32, 65504.0),
    "bf16": np.full(32, 3.3895314e38),
    "q8_0": np.r_[65504.0 * 127, np.linspace(-1e6, 1e6, 31)],
    "q4_0": np.r_[-65504.0 * 8, np.linspace(-1e5, 1e5, 31)],
    "q5_0": np.r_[65504.0 * 16, np.linspace(-1e5, 1e5, 31)],
    "q4_1": np.linspace(0.0, 65504.0 * 15, 32),
    "q5_1": np.linspace(0.0, 65504.0 * 31, 32),
}


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_largest_storable_block_matches_reference(name):
    x = LARGEST[name].astype(np.float32)[None, :]
    raw = check_against_reference(x, name)
    assert np.isfinite(FORMATS[name].dequantize(raw, x.shape)).all()


@pytest.mark.parametrize("name", BLOCK_QUANTS + K_QUANTS)
def test_row_length_not_a_multiple_of_the_block_size(name):
    fmt = FORMATS[name]
    k = fmt.block_size + 16
    pattern = rf"shape \(3, {k}\) is {k}, not a multiple of the block size {fmt.block_size}; .*does not pad"
    if fmt.can_quantize:
        with pytest.raises(QuantError, match=pattern):
            fmt.quantize(np.zeros((3, k), np.float32))
        with pytest.raises(QuantError, match=rf"\[n_blocks, {fmt.block_size}\]"):
            fmt.quantize_blocks(np.zeros((3, k), np.float32))
    with pytest.raises(QuantError, match=pattern):
        fmt.dequantize(np.zeros(3 * fmt.type_size * 2, np.uint8), (3, k))


@pytest.mark.parametrize("name", QUANTIZABLE + K_QUANTS)
def test_raw_buffer_of_the_wrong_size(name):
    fmt = FORMATS[name]
    shape = (4, 2 * fmt.block_size)
    raw = np.zeros((4, 2 * fmt.type_size), np.uint8)
    fmt.dequantize(raw, shape)  # the right size is fine
    with pytest.raises(
        QuantError, match=rf"shape \(4, {shape[1]}\) takes {raw.size} bytes .*got {raw.size - 1}"
    ):
        fmt.dequantize(raw.reshape(-1)[:-1], shape)
    with pytest.raises(QuantError, match="got 0"):
        fmt.dequantize(raw[:0], shape)
    with pytest.raises(QuantError, match=rf"uint8 \[n_blocks, {fmt.type_size}\]"):
        fmt.dequantize_blocks(raw.reshape(-1, fmt.type_size)[:, 1:])
    with pytest.raises(QuantError, match="int16"):
        fmt.dequantize_blocks(raw.reshape(-1, fmt.type_size).astype(np.int16))


def test_scalars_are_rejected():
    with pytest.raises(QuantError, match="scalar"):
        quantize(np.float32(1.0), "f16")
    with pytest.raises(QuantError, match="scalar"):
        dequantize(np.zeros(2, np.uint8), "f16", ())


# --- accuracy ----------------------------------------------------------------------------

# Per block, |x - dequantized| <= |d| * (rounding + qmax * 2**-11) + |m| * 2**-11 (+ float32
# rounding): rounding is 1/2 a step, or a whole step for the one-sided Q4_0/Q5_0 whose
# positive end is clipped (x/d up to +8 stored as +7); the 2**-11 terms are the fp16
# rounding of d (times the largest |quant|) and of m.
ERROR_BOUND = {"q8_0": (0.5, 127), "q4_0": (1.0, 8), "q5_0": (1.0, 16), "q4_1": (0.5, 15),
               "q5_1": (0.5, 31)}  # fmt: skip


@pytest.mark.parametrize("name", BLOCK_QUANTS)
def test_roundtrip_error_is_within_a_quantization_step(name):
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    x[::7, ::45] *= 20  # outliers
    fmt = FORMATS[name]
    raw = fmt.quantize(x)
    err = np.abs(fmt.dequantize(raw, x.shape) - x).reshape(-1, 32).max(axis=1)
    blocks = fields(raw, name)
    d = np.abs(blocks["d"].astype(np.float64))
    m = np.abs(blocks["m"].astype(np.float64)) if "m" in blocks.dtype.names else 0.0
    rounding, qmax = ERROR_BOUND[name]
    bound = (
        d * (rounding + qmax * 2.0**-11) + m * 2.0**-11 + np.abs(x).reshape(-1, 32).max(1) * 2e-7
    )
    assert (err <= bound).all(), float((err / bound).max())
    assert err.max() > 0.4 * (d * rounding).min()  # the bound is not vacuous
    if name in ("q4_0", "q5_0"):  # the max-magnitude value sits exactly on the lowest quant
        xb = x.reshape(-1, 32)
        first = np.argmax(np.abs(xb), axis=1)
        amax = np.abs(xb[np.arange(len(xb)), first])
        recon = fmt.dequantize(raw, x.shape).reshape(-1, 32)[np.arange(len(xb)), first]
        assert (np.abs(recon - xb[np.arange(len(xb)), first]) <= amax * 2.0**-11).all()


def test_more_bits_give_smaller_error():
    rng = np.random.default_rng(17)
    x = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    rmse = {
        n: np.sqrt(((dequantize(quantize(x, n), n, x.shape) - x) ** 2).mean()) for n in BLOCK_QUANTS
    }
    assert rmse["q8_0"] < rmse["q5_1"] < rmse["q5_0"] < rmse["q4_1"] < rmse["q4_0"]


@pytest.mark.parametrize(("name", "rel"), [("f32", 0.0), ("f16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_types_round_to_nearest(name, rel):
    rng = np.random.default_rng(19)
    x = (rng.standard_normal((8, 64)) * 3).astype(np.float32)
    y = dequantize(quantize(x, name), name, x.shape)
    assert (np.abs(y - x) <= np.abs(x) * rel).all()


# --- shapes and API ------------------------------------------------------------------------


def test_row_helpers_keep_leading_dims_and_agree_with_block_functions():
    fmt = get_format("q4_0")
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    raw = fmt.quantize(x)
    assert raw.shape == (2, 3, 2 * 18) and fmt.row_bytes(64) == 36
    np.testing.assert_array_equal(raw.reshape(-1, 18), fmt.quantize_blocks(x.reshape(-1, 32)))
    np.testing.assert_array_equal(fmt.dequantize_blocks(raw.reshape(-1, 18)).reshape(x.shape),
                                  fmt.dequantize(raw.reshape(-1), x.shape))  # fmt: skip
    assert fmt.quantize(x[0, 0]).shape == (36,)
    empty = fmt.quantize(np.zeros((0, 64), np.float32))
    assert empty.shape == (0, 36) and fmt.dequantize(empty, (0, 64)).shape == (0, 64)


def test_f16_dequantize_reads_a_float16_array():
    x = np.array([[1.0, -2.5, 65504.0, 6e-8]], np.float16)  # as GGUFReader hands out F16 data
    assert_bits_equal(dequantize(x, "f16", x.shape), x.astype(np.float32))


def test_no_numpy_warnings_on_edge_cases():
    x = np.concatenate([edge_blocks(), (np.ones((2, 32)) * 1e-40).astype(np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in QUANTIZABLE:
            dequantize(quantize(x, name), name, x.shape)
        for name in K_QUANTS:
            dequantize(random_kquant_blocks(name, 4, seed=0), name, (4, 256))


# --- ternary types (TQ1_0, TQ2_0) ----------------------------------------------------------

TERNARY = ["tq1_0", "tq2_0"]


@pytest.mark.parametrize("name", TERNARY)
def test_ternary_types_register_with_gguf_sizes(name):
    fmt = FORMATS[name]
    qtype = gguf.GGMLQuantizationType[name.upper()]
    assert fmt.ggml_type == qtype and get_format(qtype) is fmt and fmt.can_quantize
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("name", TERNARY)
def test_ternary_weights_match_reference_and_decode_exactly(name):
    """A BitNet matrix (codes times one scale) in blocks of 256: the bytes equal the
    reference quantizer's, and decoding gives back codes * fp16(scale) exactly; an
    all-zero block and blocks holding a single +1 or -1 included."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 2, size=(12, 768)).astype(np.float32)
    codes[0, :256] = 0
    codes[1, :256] = 0
    codes[1, 100] = 1
    codes[2, 256:512] = 0
    codes[2, 511] = -1
    scale = np.float32(0.0173)
    x = codes * scale
    raw = check_against_reference(x, name)
    assert raw.shape == (12, 3 * FORMATS[name].type_size)
    decoded = FORMATS[name].dequantize(raw, x.shape)
    assert_bits_equal(decoded, codes * np.float32(np.float16(scale)))


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 0.02, 1.0, 300.0])
@pytest.mark.parametrize("name", TERNARY)
def test_ternary_types_match_reference_on_any_float_input(name, scale):
    rng = np.random.default_rng(FORMATS[name].ggml_type)
    x = (rng.standard_normal((20, 512)) * scale).astype(np.float32)
    check_against_reference(x, name)
