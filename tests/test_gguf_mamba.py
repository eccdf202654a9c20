"""GGUF for Falcon-Mamba (llama.cpp's `mamba` architecture), both ways: falconet's writer
and reader against each other, against the HF folder they came from, and against
llama.cpp (its converter and runtime): A stored as -exp(A_log), the squeezed conv
filters, the dt/B/C norm flag, and what stays float when the matrices are quantized."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from safetensors.torch import load_file

import falconet
from falconet.cli import main as cli_main
from falconet.convert import WRITE_TYPES, convert_hf_to_gguf
from falconet.models.checkpoint import read_gguf, write_type
from falconet.models.falcon_mamba import FalconMamba
from falconet.models.falcon_mamba_config import FalconMambaConfig
from falconet.models.gguf_mamba import a_from_a_log, a_log_from_a, gguf_name
from falconet.quant import get_format
from falconet.quant.linear import QuantEmbedding, QuantLinear
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import GGUFError
from tests import llama_cpp_tools
from tests.conftest import CORPUS, build_falcon_mamba_hf_model, hf_greedy, memorize
from tests.test_gguf import (
    falconet_greedy,
    llama_cpp_greedy,
    raises,
    rewrite,
    write_falcon_tokenizer,
)

T = GGMLQuantizationType
# conftest's tiny Falcon-Mamba, widened so the matrices' rows are whole 32-value blocks:
# hidden 64 (d_inner 128). rank32_tied: every matrix quantizable (dt rank 32, x_proj
# 32 + 2*16 outputs), tied head. state32_untied: A_log (128, 32) is a matrix of whole
# blocks that must still stay float; dt rank 7 has no whole blocks (F16, as llama.cpp
# falls back); conv kernel 3; untied head.
VARIANTS = {
    "rank32_tied": ("conv4_tied", dict(state_size=16, time_step_rank=32)),
    "state32_untied": ("conv3_bias_untied", dict(state_size=32, use_bias=False)),
}
PROMPT_LEN, GREEDY = 8, 32
GENTLE = "-gentle"
LAYERS = 3


def build(variant: str):
    base, over = VARIANTS[variant]
    return build_falcon_mamba_hf_model(base, hidden_size=64, **over)


def build_gentle(variant: str):
    """A variant whose logits are not dominated by rounding through its layers, for
    comparing quantized with float logits: smaller initial weights, and out_proj at
    transformers' scale (conftest multiplies it by 10 so greedy tokens vary)."""
    base, over = VARIANTS[variant]
    model = build_falcon_mamba_hf_model(base, hidden_size=64, initializer_range=0.05, **over)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("out_proj.weight"):
                p.div_(10)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """variant -> a tiny HF Falcon-Mamba folder with a Falcon-style tokenizer, trained to
    continue its text past the prompt and the greedy tokens, so those have margins of
    several logits over llama.cpp's rounding (see test_gguf.memorizing_model);
    "<variant>-gentle": `build_gentle`'s, untrained."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            write_falcon_tokenizer(folder)
            if variant.endswith(GENTLE):
                build_gentle(variant.removesuffix(GENTLE)).save_pretrained(folder)
            else:
                ids = text_ids(folder)[: PROMPT_LEN + GREEDY + 8]
                memorize(build(variant), ids, steps=40).save_pretrained(folder)
            cache[variant] = folder
        return cache[variant]

    return get


def text_ids(folder: Path) -> list[int]:
    return Tokenizer.from_dir(folder).encode(CORPUS)


def prompt(hf_dir, variant: str) -> list[int]:
    return text_ids(hf_dir(variant))[:PROMPT_LEN]


def hf_model(folder: Path):
    from transformers import FalconMambaForCausalLM

    return FalconMambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---- falconet's writer -> falconet's reader ---------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_written_tensors_are_the_checkpoints_in_the_chosen_types(hf_dir, ours, variant, qtype):
    folder = hf_dir(variant)
    path = ours(variant, qtype)
    ckpt = read_gguf(path)
    config = FalconMambaConfig.from_file(folder / "config.json")
    assert ckpt.config == dataclasses.replace(config, torch_dtype=ckpt.config.torch_dtype)
    state = load_file(folder / "model.safetensors")  # a tied head is not stored
    assert set(ckpt.tensors) == set(state)
    kind = WRITE_TYPES[qtype][0]
    for hf_name, t in ckpt.tensors.items():
        w = state[hf_name]
        if hf_name.endswith(".A_log"):  # llama.cpp's form: A itself, F32 in every file
            assert t.name.endswith(".ssm_a") and t.tensor_type == T.F32
            w = a_from_a_log(w)
        elif hf_name.endswith(".conv1d.weight"):  # (E, 1, K) -> (E, K), F32 in every file
            assert t.tensor_type == T.F32
            w = w[:, 0, :]
        want = write_type(hf_name, tuple(w.shape), kind, config)
        if w.ndim == 1:  # norms, D, biases
            assert want == T.F32, t.name
        elif hf_name.endswith((".A_log", ".conv1d.weight")):
            assert want == T.F32
        elif w.shape[1] % 32:  # dt_proj of rank 7: no whole blocks
            assert want == (kind if kind in (T.F32, T.F16) else T.F16), t.name
        elif t.name == ("token_embd.weight" if config.tie_word_embeddings else "output.weight"):
            assert want == (T.Q8_0 if kind == T.Q4_0 else kind)  # the head's rule
        else:
            assert want == kind, t.name
        assert t.tensor_type == want, t.name
        expected = get_format(want).quantize(w.float().numpy())
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), expected.reshape(-1))
    assert GGUFReader(path).get_field("mamba.ssm.dt_b_c_rms").contents() is True


def test_names_are_llama_cpps():
    assert gguf_name("backbone.layers.3.mixer.x_proj.weight") == "blk.3.ssm_x.weight"
    assert gguf_name("backbone.layers.0.mixer.A_log") == "blk.0.ssm_a"
    assert gguf_name("backbone.layers.2.mixer.D") == "blk.2.ssm_d"
    assert gguf_name("backbone.layers.1.mixer.conv1d.bias") == "blk.1.ssm_conv1d.bias"
    assert gguf_name("backbone.layers.1.norm.weight") == "blk.1.attn_norm.weight"
    assert gguf_name("backbone.norm_f.weight") == "output_norm.weight"


def test_a_log_read_back_gives_the_same_a_to_the_bit():
    """log(-A) alone misses A_log by an ulp for some values; the reader picks the fp32
    A_log whose -exp is the file's A exactly, so the scan sees transformers' A."""
    torch.manual_seed(0)
    a_log = torch.cat([torch.log(torch.arange(1, 65.0)), torch.randn(200_000) * 3])
    a = a_from_a_log(a_log)
    plain = torch.log(-a.double()).float()
    assert (a_from_a_log(plain) != a).any()  # the problem is real
    assert torch.equal(a_from_a_log(a_log_from_a(a)), a)
    for bad in (torch.tensor([-1.0, 0.0]), torch.tensor([2.0]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="not negative finite"):
            a_log_from_a(bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float_ggufs_give_the_hf_folders_logits(hf_dir, ours, variant):
    folder = hf_dir(variant)
    ids = prompt(hf_dir, variant) + [5, 17, 42, 90, 3]
    from_hf = falconet.load(folder, dtype="float32")
    from_gguf = falconet.load(ours(variant, "f32"))
    assert isinstance(from_gguf.model, FalconMamba)
    assert torch.equal(from_gguf.logits(ids), from_hf.logits(ids))
    assert from_gguf.generate(ids, max_tokens=8, ignore_eos=True) == from_hf.generate(
        ids, max_tokens=8, ignore_eos=True
    )
    # F16 matrices, F32 A and conv: the model is stored in fp16, as the folder loaded so
    f16 = falconet.load(ours(variant, "f16"))
    assert f16.config.torch_dtype == "float16"
    assert torch.equal(f16.logits(ids), falconet.load(folder, dtype="float16").logits(ids))


# ---- quantized: the matrices, not the SSM parameters ------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("qtype,tol", [("q8_0", 0.03), ("q4_0", 0.25)])
@pytest.mark.parametrize("source", ["quant_at_load", "gguf"])
def test_quantized_matrices_and_float_ssm_parameters(hf_dir, ours, variant, qtype, tol, source):
    """Quantized at load (`quant=`) or read from falconet's GGUF: in_proj, x_proj,
    dt_proj (where its rows are whole blocks), out_proj, embeddings and head quantized;
    A_log, D, the conv filters and the norms float and equal to the checkpoint's; the
    logits close to the float model's."""
    variant += GENTLE
    folder = hf_dir(variant)
    if source == "gguf":
        llm = falconet.load(ours(variant, qtype), dtype="float32")
    else:
        llm = falconet.load(folder, dtype="float32", quant=qtype)
    state = load_file(folder / "model.safetensors")
    model, config = llm.model, llm.config
    for i in range(LAYERS):
        mixer = model.backbone.layers[i].mixer
        p = f"backbone.layers.{i}.mixer."
        for name in ("in_proj", "x_proj", "out_proj"):
            layer = getattr(mixer, name)
            assert isinstance(layer, QuantLinear) and layer.qtype == qtype, name
            want = get_format(qtype).quantize(state[f"{p}{name}.weight"].numpy())
            assert np.array_equal(layer.weight.data.numpy(), want)
        rank_blocks = config.time_step_rank % 32 == 0
        assert isinstance(mixer.dt_proj, QuantLinear) == rank_blocks
        # the A the scan uses is the checkpoint's to the bit (see a_log_from_a)
        assert torch.equal(a_from_a_log(mixer.A_log), a_from_a_log(state[p + "A_log"]))
        assert torch.equal(mixer.conv1d.weight, state[p + "conv1d.weight"])
        assert torch.equal(mixer.D, state[p + "D"])
    emb = model.backbone.embeddings
    assert isinstance(emb, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.qtype == "q8_0"  # the head's rule (llama.cpp's quantizer)
    assert emb.fmt.name == ("q8_0" if config.tie_word_embeddings else qtype)
    ids = prompt(hf_dir, variant) + [5, 17, 42, 90, 3]
    ref = falconet.load(folder, dtype="float32").logits(ids)
    assert (llm.logits(ids) - ref).abs().max() <= tol * ref.abs().max()
    # transformers running the weights the blocks hold (and the file's F16 fallback): what
    # is left is falconet rounding activations to 8 bits per block for the integer
    # kernels, as llama.cpp does
    rounded = hf_model(folder)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2 and not name.endswith(".A_log"):
                head = name == "lm_head.weight" or (
                    name == "backbone.embeddings.weight" and config.tie_word_embeddings
                )
                kind = get_format("q8_0" if head else qtype)
                if p.shape[1] % kind.block_size == 0:
                    p.copy_(torch.from_numpy(kind.dequantize(kind.quantize(p.numpy()), p.shape)))
                elif source == "gguf":  # no whole blocks: written F16
                    p.copy_(p.half().float())
        exact = rounded(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - exact).abs().max() <= 0.03 * exact.abs().max()


# ---- falconet's GGUF in llama.cpp ----------------------------------------------------------


@pytest.mark.parametrize(
    "variant,qtype",
    [("rank32_tied", "q8_0"), ("state32_untied", "q8_0"), ("rank32_tied", "q4_0")],
)
def test_llama_cpp_runs_falconets_gguf(hf_dir, ours, variant, qtype):
    path, ids = ours(variant, qtype), prompt(hf_dir, variant)
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, GREEDY)
    tokens, logits = falconet_greedy(path, ids, GREEDY)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- llama.cpp's GGUF in falconet ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_files(hf_dir, tmp_path_factory):
    """variant -> {type: path} of GGUFs made by llama.cpp's converter (f32 and q8_0)."""
    if llama_cpp_tools.llama_cpp_dir() is None:
        pytest.skip("no llama.cpp checkout with convert_hf_to_gguf.py (set FALCONET_LLAMA_CPP_DIR)")
    out = tmp_path_factory.mktemp("llama_cpp")
    files = {v: {q: out / f"{v}-{q}.gguf" for q in ("f32", "q8_0")} for v in VARIANTS}
    for q in ("f32", "q8_0"):
        llama_cpp_tools.convert([(hf_dir(v), files[v][q]) for v in VARIANTS], q)
    return files


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_gguf_runs_in_falconet(hf_dir, llama_cpp_files, variant):
    """The converter's F32 file is the HF model exactly (A read back to the bit); its
    Q8_0 file gives transformers' greedy tokens too."""
    folder, ids = hf_dir(variant), prompt(hf_dir, variant)
    reference = hf_greedy(hf_model(folder), ids, GREEDY)
    from_hf = falconet.load(folder, dtype="float32")
    f32 = falconet.load(llama_cpp_files[variant]["f32"])
    assert torch.equal(f32.logits(ids), from_hf.logits(ids))
    for qtype in ("f32", "q8_0"):
        tokens, _ = falconet_greedy(llama_cpp_files[variant][qtype], ids, GREEDY)
        assert tokens == reference, qtype


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_falconets_gguf_equals_llama_cpps(llama_cpp_files, ours, variant, qtype):
    """Same names, types and bytes as llama.cpp's converter writes (A as -exp(A_log), the
    conv filters squeezed and F32, dt_proj F16 where its rows are no whole blocks), and
    the same model and tokenizer metadata."""
    theirs = GGUFReader(llama_cpp_files[variant][qtype])
    mine_reader = GGUFReader(ours(variant, qtype))
    mine = {t.name: t for t in mine_reader.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine[t.name].data), np.asarray(t.data)), t.name
    keys = [k for k in theirs.fields if k.startswith(("mamba.", "tokenizer.ggml."))]
    assert "mamba.ssm.dt_b_c_rms" in keys and "mamba.ssm.time_step_rank" in keys
    for key in keys + ["general.file_type"]:
        assert mine_reader.get_field(key).contents() == theirs.get_field(key).contents(), key


# ---- falconet convert and bad input ------------------------------------------------------


def test_convert_command(hf_dir, tmp_path, capsys):
    out = tmp_path / "fm.gguf"
    rc = cli_main(["convert", str(hf_dir("state32_untied")), str(out), "--type", "q4_0"])
    assert rc == 0 and capsys.readouterr().out == f"wrote {out} (q4_0)\n"
    ckpt = read_gguf(out)
    c = ckpt.config
    assert (c.state_size, c.conv_kernel, c.time_step_rank, c.expand) == (32, 3, 7, 2)
    assert not c.tie_word_embeddings
    types = {name: t.tensor_type for name, t in ckpt.tensors.items()}
    assert types["backbone.layers.0.mixer.in_proj.weight"] == T.Q4_0
    assert types["backbone.layers.0.mixer.A_log"] == T.F32
    assert types["backbone.layers.0.mixer.conv1d.weight"] == T.F32
    assert types["lm_head.weight"] == T.Q8_0


@pytest.mark.parametrize(
    "over,reason",
    [(dict(use_bias=True), "in_proj and out_proj have biases"),
     (dict(use_conv_bias=False), "conv1d has no bias")],
)  # fmt: skip
def test_convert_refuses_what_llama_cpp_cannot_run(tmp_path, over, reason):
    build_falcon_mamba_hf_model("conv4_tied", **over).config.save_pretrained(tmp_path / "hf")
    with pytest.raises(GGUFError, match=reason):  # refused from config.json alone
        convert_hf_to_gguf(tmp_path / "hf", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def with_tensor(src: Path, dst: Path, name: str, data: np.ndarray) -> Path:
    """Copy a GGUF with tensor `name` replaced by the F32 array `data`."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.get_field("general.architecture").contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name == name:
            w.add_tensor(t.name, data, raw_dtype=T.F32)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_mamba_files(ours, tmp_path):
    src = ours("rank32_tied", "f32")
    raises(rewrite(src, tmp_path / "a.gguf", drop_key="mamba.ssm.dt_b_c_rms"),
           r"mamba\.ssm\.dt_b_c_rms is missing or false", "classic Mamba",
           "Falcon-Mamba only")  # fmt: skip
    raises(rewrite(src, tmp_path / "b.gguf", set_key=("mamba.ssm.dt_b_c_rms", False)),
           r"mamba\.ssm\.dt_b_c_rms is missing or false")  # fmt: skip
    for key in ("mamba.ssm.state_size", "mamba.ssm.conv_kernel", "mamba.ssm.inner_size",
                "mamba.ssm.time_step_rank", "mamba.attention.layer_norm_rms_epsilon"):  # fmt: skip
        path = rewrite(src, tmp_path / f"no-{key}.gguf", drop_key=key)
        raises(path, rf"metadata key {key.replace('.', '[.]')} is missing")
    raises(rewrite(src, tmp_path / "c.gguf", set_key=("mamba.ssm.state_size", 0)),
           r"mamba\.ssm\.state_size is 0")  # fmt: skip
    raises(rewrite(src, tmp_path / "d.gguf", set_key=("mamba.ssm.inner_size", 100)),
           r"mamba\.ssm\.inner_size 100 is not a multiple of mamba\.embedding_length 64")  # fmt: skip
    raises(rewrite(src, tmp_path / "e.gguf", set_key=("mamba.ssm.conv_kernel", 1)),
           "not a valid Falcon-Mamba config", "conv_kernel must be at least 2")  # fmt: skip
    # shapes: the metadata says state 16, conv 4, d_inner 128
    raises(rewrite(src, tmp_path / "f.gguf", reshape=("blk.1.ssm_a", (128, 8))),
           r"tensor blk\.1\.ssm_a has shape \(128, 8\), expected \(128, 16\)")  # fmt: skip
    raises(rewrite(src, tmp_path / "g.gguf", reshape=("blk.0.ssm_conv1d.weight", (128, 1, 4))),
           r"blk\.0\.ssm_conv1d\.weight has shape \(128, 1, 4\), expected \(128, 4\)")  # fmt: skip
    raises(rewrite(src, tmp_path / "h.gguf", drop_tensor="blk.2.ssm_d"),
           r"no tensor blk\.2\.ssm_d\b")  # fmt: skip
    a = next(t for t in GGUFReader(src).tensors if t.name == "blk.0.ssm_a").data
    raises(with_tensor(src, tmp_path / "i.gguf", "blk.0.ssm_a", -np.asarray(a)),
           r"tensor blk\.0\.ssm_a: it holds values that are not negative")  # fmt: skip
