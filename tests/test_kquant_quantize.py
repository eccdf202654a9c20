"""Writing K-quants: falconet's quantizers and `convert --type q4_k_m|q5_k_m|q6_k|...`
against llama.cpp itself.

- Blocks: every K-quant super-block falconet writes equals the one llama.cpp's own
  library writes for the same floats (ggml_quantize_chunk in the libggml-base that
  llama-cpp-python ships, no importance matrix), on random rows and on the rows that
  hit the corners of the scale searches (zeros, constants, lone outliers, one sign).
- Files: a K-quant GGUF falconet converts from a HF folder holds the tensors, types and
  bytes llama-quantize writes from llama.cpp's own f32 conversion of that folder, for
  Falcon, Llama (Falcon3), Falcon-H1 and Falcon-Mamba models with rows of whole
  256-value super-blocks and for one whose rows are not (llama.cpp's fallback types).
- Running: llama.cpp and falconet continue a prompt with the same greedy tokens from
  falconet's Q4_K_M file.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from falconet.convert import convert_hf_to_gguf
from falconet.errors import FalconetError
from falconet.quant import QuantError, get_format
from falconet.quant.kquantize import available, quantize_k_blocks
from falconet.quant.mixes import mix_types, use_more_bits
from falconet.tokenizer import Tokenizer
from tests import llama_cpp_tools
from tests.conftest import (
    CORPUS,
    build_falcon_h1_hf_model,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    memorize,
)
from tests.test_gguf import falconet_greedy, llama_cpp_greedy, prompt, write_falcon_tokenizer

T = GGMLQuantizationType
K_TYPES = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}

pytestmark = pytest.mark.skipif(not available(), reason="falconet's compiled kernels are not built")


# ---- blocks -------------------------------------------------------------------------


def ggml_base() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]  # fmt: skip
    return lib


def llama_cpp_blocks(lib: ctypes.CDLL, name: str, x: np.ndarray) -> np.ndarray:
    """llama.cpp's bytes for float32 rows x [n, 256] in K-quant `name`."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((len(x), BLOCK_BYTES[name]), np.uint8)
    lib.ggml_quantize_chunk(
        int(K_TYPES[name]), x.ctypes.data, out.ctypes.data, 0, len(x), 256, None
    )
    return out


def hard_rows() -> dict[str, np.ndarray]:
    """Rows of 256 values that reach the corners of the reference's scale searches."""
    rng = np.random.default_rng(7)
    outliers = rng.normal(0, 0.01, (16, 256))
    outliers[:, ::37] = 300.0  # a few huge values among small ones
    lone = np.zeros((4, 256))
    lone[:, 5], lone[:, 100] = 1.0, -3.0  # sub-blocks of zeros next to non-zero ones
    ramp = np.tile(np.linspace(-1, 1, 256), (2, 1))
    return {
        "gaussian": rng.standard_normal((256, 256)),
        "weights-sized": rng.normal(0, 0.02, (64, 256)),
        "zeros": np.zeros((2, 256)),
        "constant": np.full((2, 256), 0.37),
        "negative constant": np.full((2, 256), -2.5),
        "negative only": -np.abs(rng.standard_normal((16, 256))),
        "positive only": np.abs(rng.standard_normal((16, 256))),
        "huge outliers": outliers,
        "lone values": lone,
        "tiny": rng.standard_normal((4, 256)) * 1e-20,  # below the all-zero threshold
        "near threshold": rng.standard_normal((4, 256)) * 1e-14,
        "large": rng.standard_normal((4, 256)) * 1e4,
        "ramp": ramp,
        "bf16-rounded": rng.standard_normal((16, 256)).astype(np.float32).view(np.uint32)
        & np.uint32(0xFFFF0000),
    }


@pytest.mark.parametrize("name", list(K_TYPES))
def test_blocks_are_llama_cpps(name):
    lib = ggml_base()
    for kind, rows in hard_rows().items():
        x = rows.view(np.float32) if rows.dtype == np.uint32 else rows.astype(np.float32)
        ours = quantize_k_blocks(name, x, BLOCK_BYTES[name])
        theirs = llama_cpp_blocks(lib, name, x)
        bad = np.flatnonzero((ours != theirs).any(axis=1))
        assert bad.size == 0, (
            f"{name} {kind}: {bad.size} of {len(x)} blocks differ (first {bad[0]})"
        )


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_formats_write_k_quants_and_read_them_back(name):
    """QuantFormat.quantize on rows of several super-blocks gives llama.cpp's bytes, and
    its decoder gives back the values within the format's step."""
    lib = ggml_base()
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (6, 1024)).astype(np.float32)
    fmt = get_format(name)
    raw = fmt.quantize(w)
    assert raw.shape == (6, 4 * fmt.type_size)
    assert np.array_equal(
        raw.reshape(-1, fmt.type_size), llama_cpp_blocks(lib, name, w.reshape(-1, 256))
    )
    back = fmt.dequantize(raw, w.shape)
    assert np.abs(back - w).max() < {"q4_k": 0.05, "q5_k": 0.025, "q6_k": 0.012}[name]


@pytest.mark.parametrize("name", list(K_TYPES))
def test_decoders_are_gguf_pys(name):
    """Dequantized values equal gguf-py's reference decoders bit for bit."""
    from gguf import quants

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((8, 512)) * np.array([1e-3, 1.0])[:, None].repeat(4, 0)).astype(
        np.float32
    )
    fmt = get_format(name)
    raw = fmt.quantize(w)
    ours = fmt.dequantize(raw, w.shape)
    theirs = quants.dequantize(raw, K_TYPES[name]).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_bad_input_to_k_quants():
    fmt = get_format("q4_k")
    with pytest.raises(QuantError, match="not a multiple of the block size 256"):
        fmt.quantize(np.zeros((2, 96), np.float32))
    with pytest.raises(QuantError, match="non-finite"):
        fmt.quantize(np.full((1, 256), np.nan, np.float32))
    with pytest.raises(QuantError, match="too large for the format"):
        fmt.quantize(np.full((1, 256), 1e9, np.float32))


# ---- the mixes ---------------------------------------------------------------------------


def test_use_more_bits_layers():
    """llama.cpp's choice for 32 layers: the first and last 4 and every third between."""
    chosen = [i for i in range(32) if use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_mix_rules_for_a_falcon_file():
    shapes = {"token_embd.weight": (448, 256), "output.weight": (448, 256),
              "output_norm.weight": (256,)}  # fmt: skip
    for i in range(16):
        shapes |= {f"blk.{i}.attn_qkv.weight": (384, 256), f"blk.{i}.attn_output.weight": (256, 256),
                   f"blk.{i}.ffn_up.weight": (1024, 256), f"blk.{i}.ffn_down.weight": (256, 1024),
                   f"blk.{i}.attn_norm.weight": (256,)}  # fmt: skip
    types = mix_types("q4_k_m", shapes, "falcon", 16)
    assert types["output.weight"] == "q8_0" and types["token_embd.weight"] == "q4_k"
    assert types["output_norm.weight"] == "f32"
    assert types["blk.0.ffn_down.weight"] == "q6_k"  # the first 1/16 of a falcon's layers
    assert types["blk.1.ffn_down.weight"] == "q5_k" and types["blk.3.ffn_down.weight"] == "q4_k"
    with pytest.raises(QuantError, match="unknown K-quant mix"):
        mix_types("q2_k_s", shapes, "falcon", 16)


# ---- whole files against llama-quantize ------------------------------------------------


# name -> (family, variant, HF config overrides). Rows of whole super-blocks (hidden 256)
# on 9 to 16 layers, where llama.cpp's layer-dependent choices differ from layer to layer
# (Falcon's Q4_K_M ffn_down rule needs 16 for its first-sixteenth layer; 12 puts blk.10
# and blk.11 where llama.cpp's numeric tensor order and a string sort disagree); the last
# model has rows of 96, 72 and 256 values: fallback types and F16.
MODELS = {
    "falcon_40b": ("falcon", "40b", dict(hidden_size=256, num_hidden_layers=16)),
    "falcon_7b": ("falcon", "7b", dict(hidden_size=256, num_hidden_layers=9)),
    "llama": ("llama", "falcon3_shape", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=12,
                                             num_attention_heads=8, num_key_value_heads=2)),
    "llama_tied_odd_rows": ("llama", "gqa3_tied", dict(intermediate_size=256, num_hidden_layers=3)),
    "falcon_h1": ("falcon_h1", "gated_norm", dict(
        mamba_rms_norm=True, mamba_norm_before_gate=False, hidden_size=256, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        mamba_d_ssm=256, mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16)),
    "falcon_mamba": ("falcon_mamba", "conv4_tied", dict(hidden_size=256, time_step_rank=32)),
}  # fmt: skip
MIXES = ("q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k")
# the other mixes, on two models (one per architecture rule set) to keep the run short
MORE_MIXES = ("q4_k_s", "q5_k_s", "q3_k_s", "q3_k_l")
SSM_MODELS = ("falcon_h1", "falcon_mamba")  # two mixes each: their tensors' rules
CASES = (
    [(m, x) for m in MODELS if m not in SSM_MODELS for x in MIXES]
    + [(m, x) for m in ("falcon_40b", "llama") for x in MORE_MIXES]
    + [(m, x) for m in SSM_MODELS for x in ("q4_k_m", "q2_k")]
)


def save_model(name: str, folder: Path, memorized: bool = False, **changes) -> Path:
    family, variant, over = MODELS[name]
    over = over | changes
    folder.mkdir(parents=True)
    write_falcon_tokenizer(folder)
    if family == "falcon_h1":  # the whole config given, as build_falcon_h1_hf_model takes it
        model = build_falcon_h1_hf_model(variant, over)
    else:
        build = {"falcon": build_hf_model, "llama": build_llama_hf_model,
                 "falcon_mamba": build_falcon_mamba_hf_model}[family]  # fmt: skip
        model = build(variant, **over)
    if memorized:
        model = memorize(model, Tokenizer.from_dir(folder).encode(CORPUS)[:32], 30)
    model.save_pretrained(folder)
    if variant == "7b":  # llama.cpp's converter regroups QKV by num_kv_heads (see test_gguf)
        config = json.loads((folder / "config.json").read_text())
        config["num_kv_heads"] = 1
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama_cpp_mixes(tmp_path_factory):
    """model -> (HF folder, {mix: llama-quantize's file from llama.cpp's f32 conversion})."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llama_cpp_tools.llama_cpp_dir() is None:
        pytest.skip("no llama.cpp checkout with convert_hf_to_gguf.py (set FALCONET_LLAMA_CPP_DIR)")
    out = tmp_path_factory.mktemp("kmix")
    folders = {m: save_model(m, out / m) for m in MODELS}
    llama_cpp_tools.convert([(folders[m], out / f"{m}-f32.gguf") for m in MODELS])
    files = {}
    for m in MODELS:
        files[m] = {}
        for mix in [x for model, x in CASES if model == m]:
            files[m][mix] = out / f"{m}-{mix}.gguf"
            llama_cpp_tools.quantize(out / f"{m}-f32.gguf", files[m][mix], f"MOSTLY_{mix.upper()}")
    return {m: (folders[m], files[m]) for m in MODELS}


@pytest.mark.parametrize("model,mix", CASES)
def test_converted_k_quant_file_is_llama_quantizes(llama_cpp_mixes, tmp_path, model, mix):
    folder, files = llama_cpp_mixes[model]
    ours = tmp_path / f"{mix}.gguf"
    convert_hf_to_gguf(folder, ours, mix)
    theirs = {t.name: t for t in GGUFReader(files[mix]).tensors}
    mine = {t.name: t for t in GGUFReader(ours).tensors}
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert mine[name].tensor_type == t.tensor_type, f"{name}: {mine[name].tensor_type!r}"
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(t.data)), name
    kinds = {t.tensor_type for t in theirs.values()}
    if model == "llama_tied_odd_rows":  # the fallbacks are exercised
        assert kinds & {T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_0} and T.F16 in kinds
    elif mix in ("q6_k", "q5_k_s", "q3_k_s"):  # one K-quant, the head aside
        assert len(kinds & set(K_TYPES.values()) - {T.Q6_K}) <= 1
    else:  # more than one K-quant: the layer-dependent choices are exercised
        assert len(kinds & set(K_TYPES.values())) >= 2
    mine_file = GGUFReader(ours)
    assert (mine_file.get_field("general.file_type").contents()
            == GGUFReader(files[mix]).get_field("general.file_type").contents())  # fmt: skip


def test_llama_cpp_runs_falconets_q4_k_m(tmp_path):
    """llama.cpp and falconet continue a prompt alike from falconet's Q4_K_M file (a
    memorized tiny Falcon3-shaped model: greedy margins far above the rounding)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder = save_model("llama", tmp_path / "hf", memorized=True, num_hidden_layers=3)
    path = tmp_path / "q4_k_m.gguf"
    convert_hf_to_gguf(folder, path, "q4_k_m")
    assert {t.tensor_type for t in GGUFReader(path).tensors} >= {T.Q4_K, T.Q6_K}
    ids = prompt(folder)
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, 16)
    tokens, logits = falconet_greedy(path, ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- the command line ------------------------------------------------------------------


def test_convert_command_k_quant_types(tmp_path, capsys):
    from falconet.cli import main as cli_main

    folder = save_model("llama_tied_odd_rows", tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert cli_main(["convert", str(folder), str(out), "--type", "q4_k_m"]) == 0
    assert GGUFReader(out).get_field("general.file_type").contents() == 15  # MOSTLY_Q4_K_M
    assert cli_main(["convert", str(folder), str(tmp_path / "x.gguf"), "--type", "q4_k"]) == 2
    assert "invalid choice: 'q4_k'" in capsys.readouterr().err
    with pytest.raises(FalconetError, match="is not one of"):
        convert_hf_to_gguf(folder, tmp_path / "y.gguf", "q4_k")
    assert not os.path.exists(tmp_path / "y.gguf")


@pytest.mark.parametrize("model", ["falcon_7b", "llama"])
def test_quant_mix_at_load_holds_what_the_converted_file_holds(tmp_path, model):
    """`falconet.load(folder, quant="q4_k_m")` quantizes each matrix as it streams in to
    the type and bytes the Q4_K_M file `falconet convert` writes (llama-quantize's, per the
    tests above), and both compute the same logits."""
    import falconet
    from falconet.quant.linear import QuantLinear

    folder = save_model(model, tmp_path / "hf")
    path = tmp_path / "q4_k_m.gguf"
    convert_hf_to_gguf(folder, path, "q4_k_m")
    loaded = falconet.load(folder, dtype="float32", quant="q4_k_m")
    from_file = falconet.load(path)
    ours = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in from_file.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(ours) == set(theirs) and ours
    assert "q4_k" in {m.qtype for m in ours.values()}
    for name, m in ours.items():
        assert m.qtype == theirs[name].qtype, name
        assert torch.equal(m.weight.data, theirs[name].weight.data), name
    ids = [5, 9, 17, 3, 11, 2]  # the same blocks through the same kernels: the same bits
    assert torch.equal(loaded.logits(ids), from_file.logits(ids))
    with pytest.raises(FalconetError, match="unknown quantization type"):
        falconet.load(folder, quant="q4_k")
