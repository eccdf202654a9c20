"""GGUF for llama / Falcon3, both ways: falconet's writer and reader against each other,
against the HF folder they came from, and against llama.cpp (its converter, quantizer
and runtime), including the Q/K row permutation llama.cpp's rope needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.torch import load_file

import falconet
from falconet.cli import main as cli_main
from falconet.convert import WRITE_TYPES, convert_hf_to_gguf
from falconet.models.checkpoint import load_gguf_weights, read_gguf, write_type
from falconet.models.gguf_llama import rows
from falconet.models.llama import Llama
from falconet.models.llama_config import LlamaConfig
from falconet.quant import get_format
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import GGUFError
from tests import llama_cpp_tools
from tests.conftest import CORPUS, build_llama_hf_model, memorize
from tests.test_gguf import (
    TEXTS,
    falconet_greedy,
    llama_cpp_greedy,
    prompt,
    raises,
    rewrite,
    write_falcon_tokenizer,
)

T = GGMLQuantizationType

# test_llama's variants, with an FFN 256 wide so llama.cpp's K-quants have whole
# super-blocks somewhere (ffn_down); gqa3_tied's o_proj is 72 wide: no whole Q4_0 blocks.
VARIANTS = ("falcon3_shape", "gqa3_tied", "biases", "rope_linear", "rope_llama3")


def memorizing_model(variant: str, ids: list[int], steps: int = 30):
    """A tiny HF Llama trained to continue `ids`, so greedy tokens have margins of several
    logits over llama.cpp's rounding (8-bit activations, fp16 K/V); see test_gguf."""
    return memorize(build_llama_hf_model(variant, intermediate_size=256), ids, steps)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """variant -> a tiny HF llama folder with a Falcon-style tokenizer (built once)."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            write_falcon_tokenizer(folder)
            ids = Tokenizer.from_dir(folder).encode(CORPUS)[:32]
            memorizing_model(variant, ids).save_pretrained(folder)
            cache[variant] = folder
        return cache[variant]

    return get


# ---- falconet's writer -> falconet's reader ---------------------------------------------


@pytest.mark.parametrize("variant", ["falcon3_shape", "gqa3_tied"])
@pytest.mark.parametrize("qtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_written_tensors_are_the_checkpoints_in_the_chosen_types(hf_dir, ours, variant, qtype):
    folder = hf_dir(variant)
    ckpt = read_gguf(ours(variant, qtype))
    config = LlamaConfig.from_file(folder / "config.json")
    assert ckpt.config == config.__class__(
        **{**vars(config), "torch_dtype": ckpt.config.torch_dtype}
    )
    state = load_file(folder / "model.safetensors")  # a tied head is not stored
    assert set(ckpt.tensors) == set(state)
    assert ("lm_head.weight" in state) == (not config.tie_word_embeddings)
    kind = WRITE_TYPES[qtype][0]
    for hf_name, t in ckpt.tensors.items():
        w = state[hf_name]
        order = rows(hf_name, config, to_file=True)
        if order is not None:  # Q and K rows as llama.cpp's rope pairs them
            w = w[order]
        want = write_type(hf_name, tuple(w.shape), kind, config)
        assert t.tensor_type == want, t.name
        if w.ndim == 2 and w.shape[1] % 32:
            assert want == (kind if kind in (T.F32, T.F16, T.BF16) else T.F16)  # no whole blocks
        expected = get_format(want).quantize(w.float().numpy())
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), expected.reshape(-1))


def test_rope_rows_are_llama_cpps_permutation():
    """GGUF row 2i + j of each head is HF row j*D/2 + i, and reading undoes writing."""
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    to_file = rows("model.layers.0.self_attn.q_proj.weight", config, to_file=True)
    assert to_file[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and to_file[8:10].tolist() == [8, 12]
    k_back = rows("model.layers.3.self_attn.k_proj.bias", config, to_file=False)
    k_to = rows("model.layers.3.self_attn.k_proj.weight", config, to_file=True)
    assert len(k_to) == 16 and torch.equal(k_to[k_back], torch.arange(16))
    assert rows("model.layers.0.self_attn.v_proj.weight", config, to_file=True) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_gguf_gives_the_hf_folders_logits(hf_dir, ours, variant):
    from_gguf = falconet.load(ours(variant, "f32"))
    from_hf = falconet.load(hf_dir(variant), dtype="float32")
    assert isinstance(from_gguf.model, Llama)
    ids = from_hf.tokenizer.encode(TEXTS[0] + TEXTS[3])
    if variant == "rope_llama3":
        # the file holds llama.cpp's per-frequency divisors; dividing by them rounds
        # differently from transformers' interpolation formula, by an ulp or so
        assert from_gguf.config.rope_freq_factors and not from_gguf.config.rope_scaling_type
        assert (from_gguf.logits(ids) - from_hf.logits(ids)).abs().max() <= 1e-4
    else:
        assert torch.equal(from_gguf.logits(ids), from_hf.logits(ids))
    assert from_gguf.generate(ids, max_tokens=8, ignore_eos=True) == from_hf.generate(
        ids, max_tokens=8, ignore_eos=True
    )


def test_quantized_q_and_k_are_reordered_blocks(ours):
    """Q4_0 Q/K rows are moved as whole blocks (a copy); the other matrices stay views of
    the file's memory map."""
    ckpt = read_gguf(ours("falcon3_shape", "q4_0"))
    with torch.device("meta"):
        model = Llama(ckpt.config, torch.float32)
    load_gguf_weights(model, ckpt)
    attn = model.model.layers[0].self_attn
    file_q = torch.from_numpy(
        np.asarray(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].data)
    )
    order = rows("model.layers.0.self_attn.q_proj.weight", ckpt.config, to_file=False)
    assert torch.equal(attn.q_proj.weight_blocks, file_q[order])
    v_file = ckpt.tensors["model.layers.0.self_attn.v_proj.weight"].data
    assert attn.v_proj.weight_blocks.data_ptr() == v_file.ctypes.data


# ---- falconet's GGUF in llama.cpp ----------------------------------------------------------


@pytest.mark.parametrize(
    "variant,qtype",
    [("falcon3_shape", "q4_0"), ("falcon3_shape", "q8_0"), ("gqa3_tied", "q4_0"),
     ("gqa3_tied", "q8_0"), ("biases", "q8_0"), ("rope_linear", "q8_0"), ("rope_llama3", "q4_0")],
)  # fmt: skip
def test_llama_cpp_runs_falconets_gguf(hf_dir, ours, variant, qtype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, ids = ours(variant, qtype), prompt(hf_dir(variant))
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, 16)
    tokens, logits = falconet_greedy(path, ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- llama.cpp's GGUF in falconet ----------------------------------------------------------

CONVERTED = VARIANTS


@pytest.fixture(scope="module")
def llama_cpp_files(hf_dir, tmp_path_factory):
    """variant -> {type: path} of GGUFs made by llama.cpp: its converter (f32), then its
    quantizer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llama_cpp_tools.llama_cpp_dir() is None:
        pytest.skip("no llama.cpp checkout with convert_hf_to_gguf.py (set FALCONET_LLAMA_CPP_DIR)")
    out = tmp_path_factory.mktemp("llama_cpp")
    llama_cpp_tools.convert([(hf_dir(v), out / f"{v}-f32.gguf") for v in CONVERTED])
    files = {}
    for v in CONVERTED:
        files[v] = {"F32": out / f"{v}-f32.gguf"}
        for q in ("Q4_0", "Q8_0", "Q4_K_M"):
            files[v][q] = out / f"{v}-{q}.gguf"
            llama_cpp_tools.quantize(files[v]["F32"], files[v][q], f"MOSTLY_{q}")
    return files


@pytest.mark.parametrize("variant", CONVERTED)
@pytest.mark.parametrize("qtype", ["F32", "Q4_0", "Q8_0", "Q4_K_M"])
def test_llama_cpp_gguf_runs_in_falconet(hf_dir, llama_cpp_files, variant, qtype):
    path, ids = llama_cpp_files[variant][qtype], prompt(hf_dir(variant))
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, 16)
    tokens, logits = falconet_greedy(path, ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()
    if qtype == "Q4_K_M":  # K-quants where the rows are whole super-blocks (ffn_down)
        assert {t.tensor_type for t in GGUFReader(path).tensors} & {T.Q4_K, T.Q5_K, T.Q6_K}


@pytest.mark.parametrize("variant", ["falcon3_shape", "gqa3_tied"])
def test_llama_cpp_f32_gguf_gives_the_hf_folders_logits(hf_dir, llama_cpp_files, variant):
    """llama.cpp's converter output read back is the HF model exactly: the Q/K permutation
    is undone row for row."""
    from_gguf = falconet.load(llama_cpp_files[variant]["F32"])
    from_hf = falconet.load(hf_dir(variant), dtype="float32")
    ids = prompt(hf_dir(variant))
    assert torch.equal(from_gguf.logits(ids), from_hf.logits(ids))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qtype", ["f32", "q4_0", "q8_0"])
def test_falconets_gguf_tensors_equal_llama_cpps(llama_cpp_files, ours, variant, qtype):
    """Same names, types and bytes as llama.cpp's converter + quantizer produce, and the
    same model metadata."""
    theirs = GGUFReader(llama_cpp_files[variant][qtype.upper()])
    mine_reader = GGUFReader(ours(variant, qtype))
    mine = {t.name: t for t in mine_reader.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine[t.name].data), np.asarray(t.data)), t.name
    model_keys = [k for k in theirs.fields if k.startswith("llama.")]
    assert "llama.attention.key_length" in model_keys and "llama.rope.freq_base" in model_keys
    for key in model_keys + ["tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                             "tokenizer.ggml.token_type", "general.file_type"]:  # fmt: skip
        assert mine_reader.get_field(key).contents() == theirs.get_field(key).contents(), key


# ---- falconet convert and bad input ------------------------------------------------------


def test_convert_command(hf_dir, tmp_path, capsys):
    out = tmp_path / "f3.gguf"
    rc = cli_main(["convert", str(hf_dir("falcon3_shape")), str(out), "--type", "q4_0"])
    assert rc == 0 and capsys.readouterr().out == f"wrote {out} (q4_0)\n"
    ckpt = read_gguf(out)
    assert (ckpt.config.head_dim, ckpt.config.kv_heads, ckpt.config.rope_theta) == (
        32,
        2,
        1000042.0,
    )
    assert ckpt.tensors["model.layers.0.mlp.down_proj.weight"].tensor_type == T.Q4_0
    assert ckpt.tensors["lm_head.weight"].tensor_type == T.Q8_0


def test_convert_refuses_what_it_cannot_write(tmp_path):
    from tests.conftest import llama_hf_config

    # refused from config.json alone
    llama_hf_config("rope_dynamic").save_pretrained(tmp_path / "hf")
    with pytest.raises(GGUFError, match="dynamic RoPE scaling has no GGUF equivalent"):
        convert_hf_to_gguf(tmp_path / "hf", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_bad_llama_files(ours, tmp_path):
    src = ours("falcon3_shape", "f32")
    raises(rewrite(src, tmp_path / "a.gguf", drop_key="llama.attention.layer_norm_rms_epsilon"),
           r"metadata key llama\.attention\.layer_norm_rms_epsilon is missing")  # fmt: skip
    raises(rewrite(src, tmp_path / "b.gguf", set_key=("llama.attention.value_length", 16)),
           "value_length differs from key_length")  # fmt: skip
    raises(rewrite(src, tmp_path / "c.gguf", set_key=("llama.rope.dimension_count", 16)),
           "partial rotary")  # fmt: skip
    linear = ours("rope_linear", "f32")  # the file that has the key
    raises(rewrite(linear, tmp_path / "d.gguf", set_key=("llama.rope.scaling.type", "yarn")),
           "rope scaling 'yarn' is not supported")  # fmt: skip
    raises(rewrite(src, tmp_path / "e.gguf", drop_tensor="blk.1.attn_k.weight"),
           r"no tensor blk\.1\.attn_k\.weight")  # fmt: skip
    raises(rewrite(src, tmp_path / "f.gguf", set_key=("llama.attention.head_count_kv", 4)),
           r"num_attention_heads 6 is not a multiple of num_key_value_heads 4")  # fmt: skip
