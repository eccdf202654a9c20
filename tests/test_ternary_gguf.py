"""llama.cpp's ternary GGUF types run natively: a TQ2_0 (or TQ1_0) file of a tiny BitNet
model keeps its 2-bit codes as blocks and computes through the compiled TQ2_0 kernel --
never a float weight -- against the float path of the same weights and itself in a
batch (llama.cpp's greedy tokens on these files: tests/test_ternary.py), and the kernel against a PyTorch rendering of its arithmetic; malformed
ternary tensors name themselves."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import falconet
from falconet.quant import get_format, kernels
from falconet.quant.linear import QuantLinear
from falconet.quant.tquants import transcode
from falconet.weights.gguf import GGUFError
from tests.test_engine import batch_and_alone
from tests.test_ternary import PROMPT, TQ_SIZES, build_bitnet_model, tq_scales

TQ_TYPES = ("tq2_0", "tq1_0")
native = pytest.mark.skipif(not kernels.tq2_available(), reason="compiled kernels not built")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny BitNet model (1 / weight_scale exact in float16) as TQ2_0, TQ1_0 and F16
    GGUF files: the F16 file holds the same weights and embeddings as the TQ files."""
    from falconet.convert import convert_hf_to_gguf

    folder = tmp_path_factory.mktemp("tq")
    build_bitnet_model(folder / "hf", {}, seed=4, scales=tq_scales, **TQ_SIZES)
    out = {}
    for qtype in (*TQ_TYPES, "f16"):
        out[qtype] = folder / f"{qtype}.gguf"
        convert_hf_to_gguf(folder / "hf", out[qtype], qtype)
    return out


def ternary_layers(llm) -> dict[str, QuantLinear]:
    return {n: m for n, m in llm.model.named_modules() if isinstance(m, QuantLinear)
            and m.qtype in TQ_TYPES}  # fmt: skip


@native
@pytest.mark.parametrize("qtype", TQ_TYPES)
def test_tq_file_runs_on_its_packed_codes(files, qtype):
    """Every projection holds TQ2_0 blocks (uint8, 66 bytes per 256 weights: the file's
    bytes for TQ2_0, TQ1_0's transcoded) and no float copy of its weight exists; the
    logits are the float path's (the F16 file of the same weights) up to the rounding of
    the activations to 8 bits per 256 values (llama.cpp's Q8_K, as its TQ kernels do):
    3.1 % relative RMS on this random model, asserted below 5 %. A layer's output is the
    kernel's on its blocks, bit for bit, and not the dequantized weight's product."""
    llm = falconet.load(files[qtype], dtype="float32")
    seen = []
    down = llm.model.model.layers[1].mlp.down_proj
    hook = down.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    got = llm.logits(PROMPT + PROMPT)
    hook.remove()
    [(x, y)] = seen
    # 256 rows: tiles of 8 since the first forward where the SIMD kernels run
    assert down.layout == kernels.cpu_layout(down.fmt, down.out_features)
    tiles = down.layout == kernels.TQ2_TILES
    assert torch.equal(y, kernels.tq2_linear(x, down.weight_blocks, down.out_features, tiles))
    assert not torch.allclose(y, x @ down.weight.dequantize().T, rtol=1e-4, atol=1e-4)
    ref = falconet.load(files["f16"], dtype="float32").logits(PROMPT + PROMPT)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{qtype}: relative RMS logit difference vs the float path = {rel:.3f}")
    assert rel < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8

    layers = ternary_layers(llm)
    assert len(layers) == 2 * 7  # every projection of both layers; embeddings, head F16
    tensors = {t.name: t for t in GGUFReader(files[qtype]).tensors}
    file_bytes = sum(
        int(t.n_bytes) for t in tensors.values() if t.tensor_type.name == qtype.upper()
    )
    held = 0
    tq2 = get_format("tq2_0")
    for layer in layers.values():
        assert layer.weight_blocks.dtype == torch.uint8
        assert tuple(layer.weight_blocks.shape) == (
            layer.out_features,
            tq2.row_bytes(layer.in_features),
        )
        assert not any(p.is_floating_point() and p.numel() >= layer.in_features * layer.out_features
                       for p in layer.parameters())  # fmt: skip
        held += layer.weight_blocks.nbytes
    # 2.0625 bits per weight: the file's bytes for TQ2_0, 66/54 of them for TQ1_0
    assert held == (file_bytes if qtype == "tq2_0" else file_bytes * 66 // 54)
    assert held == sum(m.in_features * m.out_features for m in layers.values()) // 256 * 66

    # the layer reads back the file's blocks, in the file's type
    t = tensors["blk.1.ffn_down.weight"]
    assert down.weight.fmt.name == qtype
    assert np.array_equal(down.weight.data.numpy(), np.asarray(t.data))
    # held as tiles (or TQ1_0's transcoded rows): the file's pages were released then
    assert down.mapped == (down.layout == "ggml")
    rows = kernels.relayout(down.fmt, down.weight_blocks, down.in_features, down.layout, "ggml")
    assert np.array_equal(rows.numpy(), np.asarray(t.data))


@native
@pytest.mark.parametrize("qtype", TQ_TYPES)
def test_batching_never_changes_a_sequence(files, qtype):
    """Tokens and log-probs bit for bit alone and in a batch: each activation row is
    rounded and summed by itself, in one fixed order."""
    llm = falconet.load(files[qtype], dtype="float32")
    together, alone = batch_and_alone(llm, llm.config.vocab_size)
    assert together == alone


# ---- the kernel -----------------------------------------------------------------------


def q8k_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T with x rounded as llama.cpp's quantize_row_q8_K_ref does (per 256
    values: iscale = -127 / the signed value of largest magnitude, q = min(127,
    round(x * iscale)), d = 1 / iscale), in float64."""
    xb = x.view(x.shape[0], -1, 256)  # float32 arithmetic, as the C code's
    top = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    zero = top == 0
    iscale = torch.where(zero, 0.0, -127.0 / torch.where(zero, 1.0, top))
    q = (xb * iscale).round().clamp(max=127)
    d = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale))
    return (q * d).double().view_as(x) @ w.double().T


@native
@pytest.mark.parametrize("K", [256, 768, 4096])
def test_kernel_equals_the_reference_and_is_row_invariant(K):
    """AVX2 (maddubs or AVX-512 VNNI) and portable paths give the same bits, on rows
    and on tiles of 8 rows; each row equals itself alone; the result is the Q8_K-rounded product to float32 rounding, with an all-zero activation
    block, an all-zero weight block and the out-of-range code 3 (weight 2 d, as
    llama.cpp's dequantizer reads it) included."""
    native_mod = kernels.native
    before = native_mod.simd()
    g = np.random.default_rng(K)
    N, M = 24, 7
    tq2 = get_format("tq2_0")
    w = (g.integers(-1, 2, (N, K)) * g.choice([0.25, 0.0625], (N, 1))).astype(np.float32)
    w[3, :256] = 0
    blocks = torch.from_numpy(tq2.quantize(w))
    blocks[5, 0] |= 3  # value 0 of row 5: code 3
    tiles = kernels.relayout(tq2, blocks, K, "ggml", kernels.TQ2_TILES)
    assert not torch.equal(tiles, blocks)
    assert torch.equal(kernels.relayout(tq2, tiles, K, kernels.TQ2_TILES, "ggml"), blocks)
    x = torch.from_numpy(g.standard_normal((M, K)).astype(np.float32) * 3)
    x[2, 256 : 512 if K > 256 else 256] = 0
    x[4, :256] = 0
    x[6, 7] = -40.0  # a negative value of largest magnitude
    results = {}
    dot_before = native_mod.int8_dot()
    for simd, dot in (("avx2", "maddubs"), ("avx2", "vnni"), ("portable", "maddubs")):
        if simd == "avx2" and before != "avx2":
            continue
        native_mod.set_simd(simd)
        try:
            native_mod.set_int8_dot(dot)
        except ValueError:  # no AVX-512 VNNI here
            continue
        try:
            y = kernels.tq2_linear(x, blocks, N)
            alone = torch.cat(
                [kernels.tq2_linear(x[i : i + 1].clone(), blocks, N) for i in range(M)]
            )
            in_tiles = kernels.tq2_linear(x, tiles, N, tiles=True)  # 4 + 3 rows a pass
            six = kernels.tq2_linear(x[:6].clone(), tiles, N, tiles=True)  # 4 + 2
            tiles_alone = torch.cat(
                [kernels.tq2_linear(x[i : i + 1].clone(), tiles, N, True) for i in range(M)]
            )
        finally:
            native_mod.set_simd(before)
            native_mod.set_int8_dot(dot_before)
        assert torch.equal(alone, y)
        assert torch.equal(in_tiles, y) and torch.equal(tiles_alone, y)
        assert torch.equal(six, y[:6])
        results[simd, dot] = y
    ys = list(results.values())
    assert all(torch.equal(ys[0], y) for y in ys)
    wd = torch.from_numpy(tq2.dequantize(blocks.numpy(), (N, K)))
    assert wd[5, 0] == 2 * np.abs(w[5, :256]).max()  # code 3 dequantizes to 2 d
    ref = q8k_reference(x, wd)
    assert (ys[0].double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_transcoding_is_lossless():
    """TQ1_0 <-> TQ2_0 blocks: the same codes and scales, byte for byte what the reference
    quantizer writes for each type."""
    g = np.random.default_rng(0)
    x = (g.integers(-1, 2, (6, 512)) * g.choice([0.5, 0.125], (6, 1))).astype(np.float32)
    x[1, :256] = 0
    t1, t2 = get_format("tq1_0"), get_format("tq2_0")
    r1, r2 = t1.quantize(x), t2.quantize(x)
    assert np.array_equal(transcode(r1, t1, t2), r2)
    assert np.array_equal(transcode(r2, t2, t1), r1)


# ---- malformed ternary tensors ------------------------------------------------------------

DOWN = "blk.1.ffn_down.weight"


def rewrite_tensor(src: Path, dst: Path, shape: tuple[int, ...], data: np.ndarray) -> Path:
    """Copy a GGUF with tensor DOWN declared as `shape` (PyTorch order) holding `data`."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.get_field("general.architecture").contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    tensors = []
    for t in r.tensors:
        d = np.asarray(t.data)
        s = tuple(int(v) for v in reversed(t.shape.tolist()))
        if t.name == DOWN:
            s, d = shape, data
        tensors.append(d)
        w.add_tensor_info(t.name, s, np.dtype(np.float32), d.nbytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for d in tensors:
        w.write_tensor_data(d)
    w.close()
    return dst


@pytest.mark.parametrize("qtype", TQ_TYPES)
def test_malformed_tq_tensors_name_the_tensor(files, tmp_path, qtype):
    src = files[qtype]
    data = np.asarray({t.name: t for t in GGUFReader(src).tensors}[DOWN].data)
    rows, row_bytes = data.shape
    cases = {
        # rows of 200 values: no whole number of 256-value blocks
        "partial_block": ((rows, 200), data[:, : row_bytes // 2].copy(), "whole 256-value blocks"),
        # one row short of the metadata's shape
        "rows": (
            (rows - 1, 512),
            data[:-1].copy(),
            r"has shape \(255, 512\), expected \(256, 512\)",
        ),
    }
    for name, (shape, bytes_, pattern) in cases.items():
        bad = rewrite_tensor(src, tmp_path / f"{name}.gguf", shape, bytes_)
        with pytest.raises(GGUFError, match=f"tensor {re.escape(DOWN)}.*{pattern}"):
            falconet.load(bad)
    # cut inside the last ternary tensor
    tensors = GGUFReader(src).tensors
    last = max(
        (t for t in tensors if t.tensor_type.name == qtype.upper()), key=lambda t: t.data_offset
    )
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: last.data_offset + int(last.n_bytes) // 2])
    with pytest.raises(GGUFError, match=f"tensor {re.escape(last.name)} is cut off"):
        falconet.load(cut)


def test_ternary_file_with_a_q8_0_head_runs_in_llama_cpp(tmp_path):
    """`falconet convert --type tq2_0 --output-tensor-type q8_0 --token-embedding-type
    q8_0`: the ternary matrices TQ2_0, head and embeddings Q8_0 (a decode step then reads
    the head at 8.5 bits per weight instead of F16's 16); llama-cpp-python runs the file
    with the greedy tokens falconet gets from it."""
    from falconet.convert import convert_hf_to_gguf
    from tests.test_gguf import falconet_greedy, llama_cpp_greedy

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    build_bitnet_model(tmp_path / "hf", {}, seed=4, scales=tq_scales, **TQ_SIZES)
    out = tmp_path / "tq2_0-q8.gguf"
    convert_hf_to_gguf(tmp_path / "hf", out, "tq2_0", output_type="q8_0", embedding_type="q8_0")
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors if len(t.shape) == 2}
    assert kinds.pop("output.weight") == kinds.pop("token_embd.weight") == "Q8_0"
    assert set(kinds.values()) == {"TQ2_0"}
    ref_tokens, ref_logits = llama_cpp_greedy(out, PROMPT, 16)
    tokens, logits = falconet_greedy(out, PROMPT, 16)
    assert tokens == ref_tokens
    assert abs(logits - ref_logits).max() <= 0.05 * abs(ref_logits).max()
