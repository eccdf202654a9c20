"""QuantLinear and its kernels against the reference codecs, and quantization at load.

The compiled kernels (falconet/quant/_kernels.c) are checked on both of their paths
(AVX2 when the CPU has it, and portable C) against numpy: dequantization bit for bit,
and the decode GEMV against the same algorithm written out in float64 (activations
rounded to 8-bit blocks exactly as the kernel rounds them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import falconet
from falconet.errors import FalconetError
from falconet.quant import QuantError, get_format, kernels
from falconet.quant.linear import QuantEmbedding, QuantLinear, QuantTensor
from falconet.quant.plan import tensor_qtype

from .conftest import build_hf_model, save_hf_model

NATIVE = sorted(kernels.NATIVE_TYPES)
needs_native = pytest.mark.skipif(kernels.native is None, reason="compiled kernels not built")


def simd_paths() -> list[str]:
    if kernels.native is None:
        return []
    paths = ["portable"]
    try:
        kernels.native.set_simd("avx2")
        paths.append("avx2")
    except ValueError:
        pass
    return paths


@pytest.fixture(params=["avx2", "portable"])
def simd(request):
    if request.param not in simd_paths():
        pytest.skip(f"{request.param} kernels unavailable here")
    before = kernels.native.simd()
    kernels.native.set_simd(request.param)
    yield request.param
    kernels.native.set_simd(before)


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random weights with the awkward blocks: all zero, negative max, tiny values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = rng.uniform(0, 1, 32)
    w[1, 5] = -3.0  # the block's largest magnitude is negative
    w[2, 32:64] *= 1e-30
    return w


def emulate_gemv(fmt, raw: np.ndarray, cols: int, x: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in float64: x rounded to 8-bit blocks (scale stored as
    fp16), multiplied by the exactly dequantized weights."""
    w = fmt.dequantize(raw, (raw.shape[0], cols)).astype(np.float64)
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)
    q = np.rint(xb * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    xq = (q * d).reshape(x.shape)
    return xq @ w.T


@needs_native
@pytest.mark.parametrize("qtype", NATIVE)
def test_native_dequantize_is_bit_exact(qtype, simd):
    fmt = get_format(qtype)
    w = weights(40, 96)
    raw = fmt.quantize(w)
    got = kernels.dequantize(fmt, torch.from_numpy(raw), 96).numpy()
    want = fmt.dequantize(raw, w.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.skipif(
    kernels.native is None or "avx2" not in simd_paths(), reason="compiled quantizers need x86"
)
@pytest.mark.parametrize("qtype", NATIVE)
def test_compiled_quantizer_is_byte_exact(qtype):
    """The compiled quantizers against the numpy codecs (which tests/test_quant_formats.py
    holds to gguf.quants): random, heavy-tailed and edge blocks, values on rounding
    boundaries."""
    fmt = get_format(qtype)
    rng = np.random.default_rng(11)
    halves = np.tile((np.arange(32, dtype=np.float32) - 16) / 2, (8, 2))
    for x in (
        weights(33, 256, seed=9),
        (rng.standard_t(2, (40, 512)) * 0.02).astype(np.float32),
        halves,
        halves * np.float32(127 / 8),
        np.full((2, 64), 1e-39, np.float32),
        np.where(rng.random((4, 64)) < 0.5, -0.0, 0.0).astype(np.float32),
    ):
        out = torch.empty(x.shape[0], fmt.row_bytes(x.shape[1]), dtype=torch.uint8)
        assert kernels.quantize_into(fmt, torch.from_numpy(x), out)
        assert np.array_equal(out.numpy(), fmt.quantize(x))
    # input the codecs refuse goes back to them, for their error message
    bad = np.ones((1, 32), np.float32)
    bad[0, 3] = np.nan
    assert not kernels.quantize_into(
        fmt, torch.from_numpy(bad), torch.empty(1, fmt.row_bytes(32), dtype=torch.uint8)
    )
    huge = np.full((1, 32), 3e38, np.float32)  # fp16 scale overflows
    assert not kernels.quantize_into(
        fmt, torch.from_numpy(huge), torch.empty(1, fmt.row_bytes(32), dtype=torch.uint8)
    )
    with pytest.raises(QuantError, match="too large"):
        QuantTensor.quantize(torch.from_numpy(huge), qtype)


@needs_native
@pytest.mark.parametrize("qtype", NATIVE)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_native_gemv_matches_emulation(qtype, rows, simd):
    fmt = get_format(qtype)
    w = weights(50, 160, seed=1)
    raw = fmt.quantize(w)
    x = np.random.default_rng(2).standard_normal((rows, 160)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero activation block
    y = kernels.quant_linear(torch.from_numpy(x), fmt, torch.from_numpy(raw), 50).numpy()
    want = emulate_gemv(fmt, raw, 160, x)
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()
    # ...and close to the unrounded product (8-bit activations cost < 1 %)
    exact = x.astype(np.float64) @ fmt.dequantize(raw, w.shape).astype(np.float64).T
    assert np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()


@needs_native
@pytest.mark.parametrize("qtype", NATIVE)
def test_a_batch_equals_each_row_alone(qtype, simd):
    fmt = get_format(qtype)
    raw = torch.from_numpy(fmt.quantize(weights(33, 128, seed=3)))
    x = torch.randn(kernels.GEMV_ROWS, 128, generator=torch.Generator().manual_seed(4))
    batch = kernels.quant_linear(x, fmt, raw, 33)
    for i in range(len(x)):
        assert torch.equal(kernels.quant_linear(x[i : i + 1], fmt, raw, 33)[0], batch[i])


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_prefill_path_is_a_float_matmul(qtype):
    fmt = get_format(qtype)
    raw = fmt.quantize(weights(70, 96, seed=5))
    x = torch.randn(kernels.GEMV_ROWS + 5, 96)
    y = kernels.quant_linear(x, fmt, torch.from_numpy(raw), 70)
    w = torch.from_numpy(fmt.dequantize(raw, (70, 96)))
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_1"])
def test_without_compiled_kernels_the_fallback_agrees(qtype, monkeypatch):
    fmt = get_format(qtype)
    raw = torch.from_numpy(fmt.quantize(weights(20, 64, seed=6)))
    x = torch.randn(2, 64)
    w = torch.from_numpy(fmt.dequantize(raw.numpy(), (20, 64)))
    fast = kernels.quant_linear(x, fmt, raw, 20)
    monkeypatch.setattr(kernels, "native", None)
    slow = kernels.quant_linear(x, fmt, raw, 20)
    torch.testing.assert_close(slow, x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, slow, rtol=0.02, atol=0.02 * slow.abs().max().item())


def test_quant_linear_and_embedding_modules():
    w = torch.randn(48, 64)
    qt = QuantTensor.quantize(w, "q8_0")
    bias = torch.randn(48)
    layer = QuantLinear(qt, bias)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    ref = x.float() @ qt.dequantize().T + bias
    # 8-bit activations (x8 kernels) and a bf16 result: within 2 % of the largest output
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    emb = QuantEmbedding(qt)
    ids = torch.tensor([[0, 47], [3, 3]])
    assert torch.equal(emb(ids), qt.dequantize()[ids])
    assert "qtype=q8_0" in repr(layer)


def test_quantize_refuses_bad_weights():
    with pytest.raises(QuantError, match="non-finite"):
        w = torch.randn(4, 64)
        w[2, 7] = float("inf")
        QuantTensor.quantize(w, "q4_0", name="blk.weight")
    with pytest.raises(QuantError, match="not a multiple of the block size"):
        QuantTensor.quantize(torch.randn(4, 48), "q4_0")
    with pytest.raises(QuantError, match="2-D"):
        QuantTensor.quantize(torch.randn(64), "q4_0")
    with pytest.raises(QuantError, match="needs uint8"):
        QuantTensor(get_format("q4_0"), torch.zeros(4, 17, dtype=torch.uint8), (4, 64))
    if kernels.native is not None:
        with pytest.raises(ValueError, match="multiple of 32"):
            kernels.native.gemv(2, 0, 1, 48, 0, 1, 0, 1)
        with pytest.raises(ValueError, match="unsupported GGML type"):
            kernels.native.dequantize(14, 0, 1, 32, 0, 1)


needs_x8 = pytest.mark.skipif(
    kernels.native is None or "avx2" not in simd_paths(), reason="x8 kernels need AVX2"
)


@needs_x8
@pytest.mark.parametrize("qtype", sorted(kernels.X8_TYPES))
def test_x8_layout_same_products_and_bytes(qtype):
    """The first CPU forward repacks Q4_0/Q8_0 into interleaved tiles of 8 rows: the
    products match the row-major kernel's algorithm for decode and prompts alike, any
    batch equals each row alone, and the weight reads back as the same GGML bytes."""
    kernels.native.set_simd("avx2")
    fmt = get_format(qtype)
    raw = fmt.quantize(weights(48, 160, seed=7))
    layer = QuantLinear(QuantTensor(fmt, torch.from_numpy(raw.copy()), (48, 160)))
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((3, 160)).astype(np.float32))
    y = layer(x)
    assert layer.layout == "x8" and not np.array_equal(layer.weight_blocks.numpy(), raw)
    assert np.array_equal(layer.weight.data.numpy(), raw)
    want = emulate_gemv(fmt, raw, 160, x.numpy())
    assert np.abs(y.numpy() - want).max() <= 1e-5 * np.abs(want).max()
    for i in range(3):
        assert torch.equal(layer(x[i : i + 1])[0], y[i])
    many = torch.randn(2 * kernels.GEMV_ROWS + 3, 160)  # a prompt: row chunks in the kernel
    big = layer(many)
    want = emulate_gemv(fmt, raw, 160, many.numpy())
    assert np.abs(big.numpy() - want).max() <= 1e-5 * np.abs(want).max()
    for i in (0, kernels.GEMV_ROWS, len(many) - 1):
        assert torch.equal(layer(many[i : i + 1])[0], big[i])


@needs_x8
@pytest.mark.parametrize("qtype", sorted(kernels.X8_TYPES))
def test_vnni_products_give_the_avx2_bits(qtype):
    """AVX-512 VNNI's vpdpbusd and AVX2's maddubs + madd sum the same int8 products
    exactly, so a machine with VNNI decodes the same tokens as one without: every row
    count (one decode row, a row chunk, a prompt of several chunks) gives equal bits."""
    try:
        kernels.native.set_int8_dot("vnni")
    except ValueError:
        pytest.skip("no AVX-512 VNNI on this CPU")
    kernels.native.set_simd("avx2")
    fmt = get_format(qtype)
    # extreme rows too: all-max and all-min quants push the int16 pair sums hardest
    w = weights(64, 256, seed=3)
    w[0] = 1.0
    w[1] = -1.0
    layer = QuantLinear(QuantTensor(fmt, torch.from_numpy(fmt.quantize(w)), (64, 256)))
    x = torch.randn(2 * kernels.GEMV_ROWS + 3, 256)
    x[0] = 1.0
    x[1] = -1.0
    try:
        fast = [layer(x[:m]) for m in (1, kernels.GEMV_ROWS, len(x))]
        kernels.native.set_int8_dot("maddubs")
        slow = [layer(x[:m]) for m in (1, kernels.GEMV_ROWS, len(x))]
    finally:
        kernels.native.set_int8_dot("vnni")
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    with pytest.raises(ValueError, match="vnni or maddubs"):
        kernels.native.set_int8_dot("avx1024")


@needs_x8
def test_threads_racing_through_the_first_forward_agree():
    """The first forward repacks; threads arriving together must neither repack twice nor
    read one layout's bytes as the other's."""
    kernels.native.set_simd("avx2")
    qt = QuantTensor.quantize(torch.randn(2048, 1024), "q4_0")
    x = torch.randn(1, 1024)
    want = QuantLinear(QuantTensor(qt.fmt, qt.data.clone(), qt.shape))(x)
    layer = QuantLinear(qt)
    start = threading.Barrier(8)
    results = []

    def call():
        start.wait()
        results.append(layer(x))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(torch.equal(r, want) for r in results)
    assert layer.layout == "x8" and np.array_equal(layer.weight.data.numpy(), qt.data.numpy())


@needs_x8
def test_tied_embedding_follows_the_heads_repack(hf_checkpoints):
    _, folder = hf_checkpoints["7b"]
    llm = falconet.load(folder, dtype="float32", quant="q4_0")
    emb, head = llm.model.transformer.word_embeddings, llm.model.lm_head
    ids = torch.tensor([[0, 5, 9, 447, 446]])
    before = emb(ids)
    llm.generate("The", max_tokens=2, temperature=0)  # the first forward repacks
    assert head.layout == "x8" and emb.layout == "x8"
    assert emb.weight_blocks.data_ptr() == head.weight_blocks.data_ptr()
    assert torch.equal(emb(ids), before)
    # a device move copies every module's buffers; the tie must survive it
    llm.model._apply(lambda t: t.clone())
    assert emb.weight_blocks.data_ptr() == head.weight_blocks.data_ptr()
    assert torch.equal(emb(ids), before)


# --- quantization at load -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["7b", "40b", "11b"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_load_quantizes_every_matrix_as_planned(hf_checkpoints, variant, qtype):
    hf, folder = hf_checkpoints[variant]
    llm = falconet.load(folder, dtype="float32", quant=qtype)
    model, config = llm.model, llm.config
    hf_state = hf.state_dict()
    blk = model.transformer.h[0]
    # every matrix of a block is a QuantLinear in the requested type, byte-equal to
    # quantizing the (regrouped) HF tensor
    for name in ("self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        layer = blk.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.qtype == qtype
        want = get_format(qtype).quantize(hf_state[f"transformer.h.0.{name}.weight"].numpy())
        assert np.array_equal(layer.weight.data.numpy(), want)
    assert blk.self_attention.query_key_value.qtype == qtype
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.qtype == "q8_0"  # llama.cpp's rule
    emb = model.transformer.word_embeddings
    assert isinstance(emb, QuantEmbedding)
    assert emb.fmt.name == ("q8_0" if config.tie_word_embeddings else qtype)
    if config.tie_word_embeddings:
        assert head.weight_blocks.data_ptr() == emb.weight_blocks.data_ptr()
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert model.weight_bytes() < sum(p.numel() * 4 for p in hf.parameters()) / 3


@pytest.mark.parametrize("qtype,tol", [("q8_0", 0.03), ("q4_0", 0.25)])
def test_quantized_logits_stay_close(hf_checkpoints, qtype, tol):
    _, folder = hf_checkpoints["40b"]
    ref = falconet.load(folder, dtype="float32")
    q = falconet.load(folder, dtype="float32", quant=qtype)
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    a, b = ref.logits(ids), q.logits(ids)
    assert (a - b).abs().max() <= tol * a.abs().max()
    # decode (cached, few rows: integer kernels) agrees with the full forward (GEMM path)
    assert q.generate(ids, max_tokens=6, temperature=0) == q.generate(
        ids, max_tokens=6, temperature=0
    )


def test_odd_row_length_stays_float(hf_checkpoints):
    # this tiny falcon-rw has hidden 48: rows of 48 values are no whole 32-blocks and stay
    # float; dense_4h_to_h's rows (192 values) are quantized
    _, folder = hf_checkpoints["rw_6heads"]
    assert tensor_qtype((192, 48), "q4_0") is None
    llm = falconet.load(folder, quant="q4_0")
    quantized = [n for n, m in llm.model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized == ["transformer.h.0.mlp.dense_4h_to_h", "transformer.h.1.mlp.dense_4h_to_h"]
    assert llm.generate("The", max_tokens=8, temperature=0)


def test_load_rejects_unknown_types_and_nan_checkpoints(tmp_path, tiny_7b):
    with pytest.raises(FalconetError, match="unknown quantization type 'q3_x'"):
        falconet.load(tiny_7b, quant="q3_x")
    with pytest.raises(FalconetError, match="read-only|unknown quantization"):
        falconet.load(tiny_7b, quant="q4_k")
    model = build_hf_model("7b")
    with torch.no_grad():
        model.transformer.h[1].mlp.dense_4h_to_h.weight[3, 5] = float("nan")
    folder = save_hf_model(model, tmp_path / "nan")
    with pytest.raises(QuantError, match=r"transformer\.h\.1\.mlp\.dense_4h_to_h\.weight.*NaN"):
        falconet.load(folder, quant="q4_0")


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch, falconet

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    # A first load pages in the code it runs (PyTorch's libraries: ~180 MB of RSS that
    # is not data); the second load's growth is what the weights cost.
    del falconet.load(sys.argv[1], quant=sys.argv[2]).model
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    before = status("VmRSS:")
    llm = falconet.load(sys.argv[1], quant=sys.argv[2])
    print(json.dumps({"peak": status("VmHWM:") - before, "weights": llm.model.weight_bytes()}))
    """
)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantizing_at_load_never_holds_the_float_model(tmp_path_factory, qtype):
    """Peak RSS growth while loading <= quantized size + the largest tensor in fp32 + 10 %."""
    folder = tmp_path_factory.getbasetemp() / "rss_model"
    if not folder.exists():
        model = build_hf_model(
            "40b", vocab_size=32768, hidden_size=512, num_hidden_layers=6, num_attention_heads=8
        )
        save_hf_model(model.to(torch.bfloat16), folder)
    largest_fp32 = 32768 * 512 * 4
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(folder), qtype],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 1.10 * (m["weights"] + largest_fp32)
    assert m["peak"] <= bound, (
        f"peak RSS growth {m['peak'] / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    )
