"""quant/triton_kernels.py in Triton's CPU interpreter: matmul against the numpy codec's
dequantize + an fp32 matmul, dequantize bit for bit against the codec, the ternary
product bit for bit against the integer product of the codes.

TRITON_INTERPRET=1 must be set before `import triton`: triton.language's own helpers
(`tl.zeros`, `tl.sum`, ...) are `@triton.jit` functions, and the decorator picks the
interpreter or the compiler when it runs, at import. A test module cannot promise that
nothing imported triton before it, and setting the variable would leak into the modules
after it, so the kernels run in one subprocess: the tests write the inputs, a child
Python with TRITON_INTERPRET=1 runs every kernel call and writes the outputs back, and
the assertions run here.

The interpreter has no bfloat16 `tl.dot` (it multiplies the bit patterns; triton-lang/
triton#11584), so the bf16 prefill path is checked on a GPU by benchmarks/bench_triton.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from falconet.quant import QuantError, get_format
from falconet.quant.ternary import pack_ternary, reference_matmul

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from falconet.quant import triton_kernels  # noqa: E402  (needs triton, after the skip)

N = 50  # not a multiple of any tile
K = 32 * 11  # an odd number of blocks: every K loop ends in a partial step
QTYPES = ["q4_0", "q8_0"]
MATMUL_SHAPES = [(1, N), (3, N), (37, N), (70, 130)]  # (M, N): decode GEMV, prefill GEMM

CHILD = """
import json, sys
import numpy as np, torch
from falconet.quant import triton_kernels as tk

calls = json.load(open(sys.argv[1]))
data = np.load(sys.argv[2])
out = {"available": np.array(tk.available())}
for name, (op, qtype, size, dtype) in calls.items():
    raw = torch.from_numpy(data[name + ".raw"])
    if op == "matmul":
        x = torch.from_numpy(data[name + ".x"]).to(getattr(torch, dtype))
        out[name] = tk.matmul(x, qtype, raw, size).numpy()
    elif op == "ternary":
        out[name] = tk.ternary_matmul(torch.from_numpy(data[name + ".x"]), raw).numpy()
    else:
        out[name] = tk.dequantize(qtype, raw, size).numpy()
np.savez(sys.argv[3], **out)
"""


def weights(qtype: str, n: int = N, k: int = K, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GGML blocks of a random [n, k] weight with some all-zero blocks and some whose
    largest magnitude is negative, and the codec's float32 values of those blocks."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = w.reshape(n, k // 32, 32)  # (N, K/32, 32) view
    blocks[0, 0] = 0.0
    blocks[n - 1, k // 32 - 1] = 0.0
    blocks[1:5, 1] = -np.abs(blocks[1:5, 1])  # negative max: Q4_0's d > 0
    blocks[3, :, 7] = -9.0  # negative max in every block of a row
    fmt = get_format(qtype)
    raw = fmt.quantize(w)
    return raw, fmt.dequantize(raw, (n, k))


def activations(m: int, k: int = K, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


# The layout pinned by hand. Q4_0: d = 1.0 (fp16 0x3C00, little-endian), byte j holds
# value j low and j + 16 high; Q8_0: d = -0.5 (fp16 0xB800), q = -16..15.
HAND_Q4 = np.array([[0x00, 0x3C] + [j | (15 - j) << 4 for j in range(16)]], np.uint8)
HAND_Q8 = np.concatenate([[0x00, 0xB8], np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
HAND_Q8 = HAND_Q8.astype(np.uint8)[None]


# Ternary: 132 output features (33 packed rows: not a multiple of the 32-row tile), 100
# inputs (not a multiple of the 64-wide K step); the hand byte holds codes 2, 0, 1, 2 at
# bits 0-1 ... 6-7: weights +1, -1, 0, +1 of output rows 0..3.
TERNARY_ROWS, TERNARY_N, TERNARY_K = (1, 3, 37), 132, 100
HAND_TERNARY = np.array([[0b10_01_00_10]], np.uint8)


def ternary_weight() -> tuple[np.ndarray, np.ndarray]:
    """Random codes {-1, 0, 1} [N, K] (all three in every row) and their packed bytes."""
    codes = np.random.default_rng(7).integers(-1, 2, (TERNARY_N, TERNARY_K))
    packed = pack_ternary(torch.from_numpy(codes)).numpy()
    return codes, packed


def cases() -> dict[str, tuple[tuple, dict[str, np.ndarray]]]:
    """name -> ((op, qtype, N or cols, activation dtype), arrays) for every kernel call."""
    out = {}
    for qtype in QTYPES:
        raw, _ = weights(qtype)
        out[f"dequantize-{qtype}"] = (("dequantize", qtype, K, ""), {"raw": raw})
        for m, n in MATMUL_SHAPES:
            raw, _ = weights(qtype, n)
            args = ("matmul", qtype, n, "float32")
            out[f"matmul-{qtype}-{m}x{n}"] = (args, {"raw": raw, "x": activations(m)})
        raw, _ = weights(qtype)
        for m, dtype in [(2, "bfloat16"), (20, "float16")]:
            args = ("matmul", qtype, N, dtype)
            out[f"matmul-{qtype}-{m}-{dtype}"] = (args, {"raw": raw, "x": activations(m)})
    for m in TERNARY_ROWS:
        codes, packed = ternary_weight()
        x = np.random.default_rng(m).integers(-128, 128, (m, TERNARY_K), dtype=np.int8)
        out[f"ternary-{m}"] = (("ternary", "", 0, ""), {"raw": packed, "x": x})
    out["ternary-hand"] = (("ternary", "", 0, ""), {"raw": HAND_TERNARY, "x": np.int8([[5]])})
    out["dequantize-hand-q4_0"] = (("dequantize", "q4_0", 32, ""), {"raw": HAND_Q4})
    out["dequantize-hand-q8_0"] = (("dequantize", "q8_0", 32, ""), {"raw": HAND_Q8})
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, np.ndarray]:
    """Every kernel call of `cases()` run by the Triton interpreter in a subprocess."""
    folder = tmp_path_factory.mktemp("triton")
    calls, arrays = {}, {}
    for name, (call, data) in cases().items():
        calls[name] = call
        arrays.update({f"{name}.{key}": value for key, value in data.items()})
    (folder / "calls.json").write_text(json.dumps(calls))
    np.savez(folder / "inputs.npz", **arrays)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "calls.json", "inputs.npz", "outputs.npz"],
        cwd=folder,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        pytest.fail(f"interpreter run failed:\n{proc.stderr[-4000:]}")
    with np.load(folder / "outputs.npz") as out:
        return dict(out)


def test_available(interpreted, monkeypatch):
    assert interpreted["available"]  # in the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_kernels.available() == torch.cuda.is_available()
    monkeypatch.setattr(triton_kernels, "triton", None)
    assert not triton_kernels.available()


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_is_bit_exact(interpreted, qtype):
    _, ref = weights(qtype)
    out = interpreted[f"dequantize-{qtype}"]
    assert out.dtype == np.float32 and out.shape == (N, K)
    # int view: -0.0 (Q4_0's all-zero blocks) must stay -0.0
    assert np.array_equal(out.view(np.int32), ref.view(np.int32))
    assert (out[0, :32] == 0).all() and (out != 0).mean() > 0.8
    assert np.signbit(out[0, :32]).all() == (qtype == "q4_0")  # the -0.0 case is covered


def test_dequantize_reads_the_ggml_layout(interpreted):
    q4 = interpreted["dequantize-hand-q4_0"][0]
    assert q4.tolist() == [j - 8 for j in range(16)] + [7 - j for j in range(16)]
    q8 = interpreted["dequantize-hand-q8_0"][0]
    assert q8.tolist() == [-0.5 * q for q in range(-16, 16)]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m, n", MATMUL_SHAPES)
def test_matmul_matches_dequantize_then_fp32_matmul(interpreted, qtype, m, n):
    _, w = weights(qtype, n)
    y = interpreted[f"matmul-{qtype}-{m}x{n}"]
    assert y.dtype == np.float32 and y.shape == (m, n)
    ref = activations(m) @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert np.abs(ref).max() > 1  # a real product, not zeros matching zeros


@pytest.mark.parametrize("qtype", QTYPES)
def test_half_activations(interpreted, qtype):
    _, w = weights(qtype)
    # decode reads bf16 activations and computes in fp32
    x = torch.from_numpy(activations(2)).bfloat16().float().numpy()
    y = interpreted[f"matmul-{qtype}-2-bfloat16"]
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)
    # prefill rounds the dequantized tile to the activations' dtype for tl.dot
    x = activations(20).astype(np.float16).astype(np.float32)
    w16 = w.astype(np.float16).astype(np.float32)
    y = interpreted[f"matmul-{qtype}-20-float16"]
    np.testing.assert_allclose(y, x @ w16.T, rtol=1e-5, atol=1e-3)


def test_rejects_blocks_that_do_not_fit():
    # checked before any kernel launches, so this runs in-process
    raw = torch.from_numpy(weights("q8_0")[0])
    x = torch.zeros(1, K)
    with pytest.raises(QuantError, match=r"q8_0 weight of 51 x 352 needs uint8 \(51, 374\)"):
        triton_kernels.matmul(x, "q8_0", raw, N + 1)
    with pytest.raises(QuantError, match="q4_0 weight of 50 x 352"):
        triton_kernels.matmul(x, "q4_0", raw, N)
    with pytest.raises(QuantError, match="blocks are on cpu, the activations on meta"):
        triton_kernels.matmul(x.to("meta"), "q8_0", raw, N)
    with pytest.raises(QuantError, match="not q4_1"):
        triton_kernels.dequantize("q4_1", raw, K)


@pytest.mark.parametrize("m", TERNARY_ROWS)
def test_ternary_matmul_is_the_exact_integer_product(interpreted, m):
    """int32 sums of int8 x {-1, 0, 1}: equal to numpy's integer product of the codes and
    to the PyTorch reference (what the CPU kernel is tested against), bit for bit."""
    codes, packed = ternary_weight()
    x = np.random.default_rng(m).integers(-128, 128, (m, TERNARY_K), dtype=np.int8)
    y = interpreted[f"ternary-{m}"]
    assert y.dtype == np.int32 and y.shape == (m, TERNARY_N)
    assert np.array_equal(y, x.astype(np.int64) @ codes.T)
    ref = reference_matmul(torch.from_numpy(x), torch.from_numpy(packed))
    assert np.array_equal(y.astype(np.float32), ref.numpy())
    assert np.abs(y).max() > 1000  # a real product


def test_ternary_matmul_reads_the_packed_layout(interpreted):
    assert interpreted["ternary-hand"].tolist() == [[5, -5, 0, 5]]


def test_ternary_matmul_rejects_what_does_not_fit():
    packed = torch.from_numpy(ternary_weight()[1])
    with pytest.raises(QuantError, match=r"int8 \[M, K\] activations and uint8 \[N/4, K\]"):
        triton_kernels.ternary_matmul(torch.zeros(2, TERNARY_K + 1, dtype=torch.int8), packed)
    with pytest.raises(QuantError, match="int8"):
        triton_kernels.ternary_matmul(torch.zeros(2, TERNARY_K), packed)
    with pytest.raises(QuantError, match="codes are on cpu, the activations on meta"):
        triton_kernels.ternary_matmul(
            torch.zeros(2, TERNARY_K, dtype=torch.int8, device="meta"), packed
        )
