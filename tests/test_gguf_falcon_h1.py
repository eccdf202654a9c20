"""GGUF for Falcon-H1 (llama.cpp's `falcon-h1`), both ways: falconet's writer and reader
against transformers' FalconH1ForCausalLM, against llama.cpp (its converter, quantizer
and runtime) and against the unfolded form of TII's first llama.cpp fork; the muP
multipliers folded into the weights, the SSM parameters kept in F32, and bad files.

The engine has no Falcon-H1 state slots in this branch yet, so falconet's side of the
greedy comparisons is the model's dense forward with its own state (tests.test_falcon_h1
`greedy`) on the model falconet.load builds from the GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from safetensors.torch import load_file

import falconet
from falconet.convert import WRITE_TYPES, convert_hf_to_gguf
from falconet.models.checkpoint import read_gguf, write_type
from falconet.models.falcon_h1 import FalconH1
from falconet.models.falcon_h1_config import MULTIPLIERS, FalconH1Config
from falconet.quant import get_format
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import GGUFError
from tests import llama_cpp_tools
from tests.conftest import CORPUS, hf_greedy, memorize
from tests.test_falcon_h1 import BASE, build_hf, greedy
from tests.test_gguf import llama_cpp_greedy, prompt, raises, rewrite, write_falcon_tokenizer

T = GGMLQuantizationType
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
# test_falcon_h1's model (two groups, non-trivial multipliers) with widths llama.cpp
# quantizes: every matrix row a whole number of 32-wide blocks (attention 4 x 16,
# Mamba 8 heads x 12, d_head not a power of two).
SHAPE = dict(
    vocab_size=400, hidden_size=64, intermediate_size=96, head_dim=16, mamba_d_ssm=96,
    mamba_n_heads=8, mamba_d_head=12, mamba_d_state=8,
)  # fmt: skip
VARIANTS = {
    # the gated norm as llama.cpp computes it: gate, then normalize each group
    "gated_norm": dict(mamba_rms_norm=True, mamba_norm_before_gate=False),
    # tied, embedding 1.3 vs head 0.7: one folded matrix cannot serve both (written untied)
    "tied": dict(mamba_rms_norm=False, tie_word_embeddings=True),
    # tied with equal multipliers: folded once, stays tied
    "tied_same": dict(
        mamba_rms_norm=False, tie_word_embeddings=True, lm_head_multiplier=1.3, mamba_n_groups=1
    ),
}
SSM_PARAMS = ("ssm_a", "ssm_d", "ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_dt.bias",
              "ssm_norm.weight")  # fmt: skip
N_TOKENS = 32


def build(variant: str) -> transformers.FalconH1ForCausalLM:
    return build_hf(variant, {**SHAPE, **VARIANTS[variant]})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """variant -> a tiny HF Falcon-H1 folder, trained to continue the corpus (greedy
    margins of several logits, above llama.cpp's 8-bit rounding), with a chat template."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            write_falcon_tokenizer(folder, CHAT_TEMPLATE)
            ids = Tokenizer.from_dir(folder).encode(CORPUS)[:32]
            memorize(build(variant), ids).save_pretrained(folder)
            cache[variant] = folder
        return cache[variant]

    return get


def hf_model(folder: Path) -> transformers.FalconH1ForCausalLM:
    return transformers.FalconH1ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(folder)(torch.tensor([ids])).logits[0]


def model_of(path: Path) -> FalconH1:
    """The model falconet.load builds from a GGUF file."""
    model = falconet.load(path).model
    assert isinstance(model, FalconH1)
    return model


def logits_of(model: FalconH1, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


# ---- falconet's writer -> falconet's reader ---------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_gguf_gives_transformers_logits(hf_dir, ours, variant):
    folder = hf_dir(variant)
    path = ours(variant, "f32")
    config = read_gguf(path).config
    hf = FalconH1Config.from_file(folder / "config.json")
    # multipliers folded into the weights; the head untied where they differ
    assert all(getattr(config, m) == 1.0 for m in MULTIPLIERS)
    assert config.ssm_multipliers == (1.0,) * 5 and config.mlp_multipliers == (1.0, 1.0)
    assert config.tie_word_embeddings == (variant == "tied_same")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "mamba_d_ssm",
                  "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                  "mamba_d_conv", "mamba_rms_norm", "mamba_conv_bias", "vocab_size",
                  "max_position_embeddings"):  # fmt: skip
        assert getattr(config, field) == getattr(hf, field), field
    ids = prompt(folder) + [7, 300, 42, 11, 250]
    ref = hf_logits(folder, ids)
    assert ref.abs().max() > 1.0
    assert (logits_of(model_of(path), ids) - ref).abs().max() <= 1e-4


def fold(name: str, w: torch.Tensor, c: FalconH1Config) -> torch.Tensor:
    """transformers' multipliers applied to HF weight `name`, as llama.cpp's converter
    does (written out here, not taken from falconet)."""
    if name.endswith("embed_tokens.weight"):
        return w * c.embedding_multiplier
    if name == "lm_head.weight":
        return w * c.lm_head_multiplier
    if "k_proj" in name:
        return w * c.key_multiplier * c.attention_in_multiplier
    if "q_proj" in name or "v_proj" in name:
        return w * c.attention_in_multiplier
    if "o_proj" in name:
        return w * c.attention_out_multiplier
    if "out_proj" in name:
        return w * c.ssm_out_multiplier
    if "gate_proj" in name:
        return w * c.mlp_multipliers[0]
    if "down_proj" in name:
        return w * c.mlp_multipliers[1]
    if "in_proj" in name:
        w = w * c.ssm_in_multiplier
        E, GN = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
        edges = np.cumsum([0, E, E, GN, GN, c.mamba_n_heads])
        for (a, b), m in zip(
            zip(edges[:-1], edges[1:], strict=True), c.ssm_multipliers, strict=True
        ):
            w[a:b] *= m
        return w
    if name.endswith("A_log"):
        return -torch.exp(w)[:, None]
    if name.endswith(".D"):
        return w[:, None]
    if name.endswith("conv1d.weight"):
        return w[:, 0, :]
    if name.endswith("mamba.norm.weight"):
        return w.view(c.mamba_n_groups, -1)
    return w


@pytest.mark.parametrize("variant", ["gated_norm", "tied"])
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_written_tensors_are_the_folded_checkpoint(hf_dir, ours, variant, qtype):
    """Every tensor is the HF one with its multipliers folded, in llama.cpp's type: the
    matrices in the file's block type, the SSM parameters and norms in F32."""
    folder = hf_dir(variant)
    hf = FalconH1Config.from_file(folder / "config.json")
    ckpt = read_gguf(ours(variant, qtype))
    state = load_file(folder / "model.safetensors")
    if hf.tie_word_embeddings:  # written untied: the head is the embeddings x 0.7
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert set(ckpt.tensors) == set(state)
    kind = WRITE_TYPES[qtype][0]
    for hf_name, t in ckpt.tensors.items():
        w = fold(hf_name, state[hf_name].float(), hf)
        want = write_type(hf_name, tuple(w.shape), kind, ckpt.config)
        if w.ndim == 1 or hf_name.endswith((".A_log", ".D", "conv1d.weight", "mamba.norm.weight")):
            assert want == T.F32, t.name
        elif t.name == "output.weight" and kind == T.Q4_0:
            assert want == T.Q8_0  # llama.cpp's rule for the head in 4-bit files
        else:
            assert want == kind, t.name  # every matrix row is whole blocks here
        assert t.tensor_type == want, t.name
        expected = get_format(want).quantize(w.numpy())
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(got, expected.reshape(-1)), t.name


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_gguf_keeps_ssm_params_float_and_stays_close(hf_dir, ours, qtype):
    folder, path = hf_dir("gated_norm"), ours("gated_norm", qtype)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    for i in range(BASE["num_hidden_layers"]):
        for name in SSM_PARAMS:
            assert types[f"blk.{i}.{name}"] == T.F32, name
        for name in ("ssm_in", "ssm_out", "attn_q", "attn_k", "attn_v", "attn_output",
                     "ffn_gate", "ffn_up", "ffn_down"):  # fmt: skip
            assert types[f"blk.{i}.{name}.weight"] == WRITE_TYPES[qtype][0], name
    model = model_of(path)
    ids = prompt(folder)
    ref = hf_logits(folder, ids)
    got = logits_of(model, ids)
    # 8-bit weights: the 3 % the llama.cpp interop tests allow; 4-bit weights of a model
    # this narrow move its logits by ~7 %, and its greedy margins (> 6 logits) hold
    assert (got - ref).abs().max() <= (0.03 if qtype == "q8_0" else 0.10) * ref.abs().max()
    assert greedy(model, ids, 8) == hf_greedy(hf_model(folder), ids, 8)


# ---- falconet's GGUF in llama.cpp ----------------------------------------------------------


@pytest.mark.parametrize("variant,qtype", [("gated_norm", "q8_0"), ("tied", "q8_0"),
                                           ("gated_norm", "q4_0")])  # fmt: skip
def test_llama_cpp_runs_falconets_gguf(hf_dir, ours, variant, qtype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, ids = ours(variant, qtype), prompt(hf_dir(variant))
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, N_TOKENS)
    model = model_of(path)
    assert greedy(model, ids, N_TOKENS) == ref_tokens
    logits = logits_of(model, ids)[-1].numpy()
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- llama.cpp's GGUF in falconet ----------------------------------------------------------

CONVERTED = ("gated_norm", "tied_same")


@pytest.fixture(scope="module")
def llama_cpp_files(hf_dir, tmp_path_factory):
    """variant -> {type: path}: llama.cpp's converter (f32), then its quantizer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llama_cpp_tools.llama_cpp_dir() is None:
        pytest.skip("no llama.cpp checkout with convert_hf_to_gguf.py (set FALCONET_LLAMA_CPP_DIR)")
    out = tmp_path_factory.mktemp("llama_cpp")
    llama_cpp_tools.convert([(hf_dir(v), out / f"{v}-f32.gguf") for v in CONVERTED])
    files = {}
    for v in CONVERTED:
        files[v] = {"F32": out / f"{v}-f32.gguf"}
        for q in ("Q8_0", "Q4_0"):
            files[v][q] = out / f"{v}-{q}.gguf"
            llama_cpp_tools.quantize(files[v]["F32"], files[v][q], f"MOSTLY_{q}")
    return files


@pytest.mark.parametrize("variant", CONVERTED)
def test_llama_cpp_converter_output_gives_transformers_tokens(hf_dir, llama_cpp_files, variant):
    folder, path = hf_dir(variant), llama_cpp_files[variant]["F32"]
    ids = prompt(folder)
    model = model_of(path)
    assert greedy(model, ids, N_TOKENS) == hf_greedy(hf_model(folder), ids, N_TOKENS)
    assert (logits_of(model, ids) - hf_logits(folder, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", CONVERTED)
def test_falconets_f32_gguf_equals_llama_cpps(hf_dir, llama_cpp_files, ours, variant):
    """Same names, types, bytes (the folding in the converter's order) and keys."""
    theirs = GGUFReader(llama_cpp_files[variant]["F32"])
    mine = GGUFReader(ours(variant, "f32"))
    tensors = {t.name: t for t in mine.tensors}
    assert set(tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert tensors[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(tensors[t.name].data), np.asarray(t.data)), t.name
    for key, f in theirs.fields.items():
        if key.startswith("falcon-h1.") or key == "tokenizer.chat_template":
            assert mine.get_field(key).contents() == f.contents(), key


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_llama_cpp_quantized_gguf_runs_in_falconet(hf_dir, llama_cpp_files, qtype):
    path, ids = llama_cpp_files["gated_norm"][qtype], prompt(hf_dir("gated_norm"))
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.ssm_in.weight"] == T[qtype] and types["blk.0.ssm_a"] == T.F32
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, N_TOKENS)
    model = model_of(path)
    assert greedy(model, ids, N_TOKENS) == ref_tokens
    logits = logits_of(model, ids)[-1].numpy()
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- the unfolded form (TII's llama.cpp-Falcon-H1 fork) -------------------------------


def unfolded_gguf(hf_folder: Path, tmp: Path, break_mup: bool = False) -> Path:
    """The file TII's fork made of `hf_folder`: the checkpoint's own weights, the
    multipliers as falcon-h1.* keys and blk.N.ssm_mup_vec tensors, pre_ff_layernorm as
    blk.N.ffn_pre_norm, ssm.inner_size = mamba_expand x hidden and the width in
    ssm.mamba_d_ssm. Built from falconet's file of the same folder with every multiplier
    set to 1 (where folding changes nothing), then those keys and tensors added."""
    c = FalconH1Config.from_file(hf_folder / "config.json")
    bare = tmp / "bare"
    shutil.copytree(hf_folder, bare)
    hf = json.loads((bare / "config.json").read_text())
    hf.update({m: 1.0 for m in MULTIPLIERS}, ssm_multipliers=[1.0] * 5, mlp_multipliers=[1, 1])
    (bare / "config.json").write_text(json.dumps(hf))
    convert_hf_to_gguf(bare, tmp / "bare.gguf", "f32")
    src = GGUFReader(tmp / "bare.gguf")
    out = tmp / "unfolded.gguf"
    w = GGUFWriter(out, "falcon-h1")
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        if key == "falcon-h1.ssm.inner_size":
            value = c.mamba_expand * c.hidden_size
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    w.add_uint32("falcon-h1.ssm.mamba_d_ssm", c.mamba_d_ssm)
    w.add_uint32("falcon-h1.ssm.mamba_chunk_size", c.mamba_chunk_size)
    w.add_bool("falcon-h1.ssm.has_mup", True)
    w.add_bool("falcon-h1.mamba_norm_before_gate", c.mamba_norm_before_gate)
    for m in MULTIPLIERS:
        w.add_float32(f"falcon-h1.{m}", getattr(c, m))
    w.add_float32("falcon-h1.mlp_gate_multiplier", c.mlp_multipliers[0])
    w.add_float32("falcon-h1.mlp_down_multiplier", c.mlp_multipliers[1])
    E, GN = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
    sizes = (E, E, GN, GN, c.mamba_n_heads)
    mup = np.concatenate(
        [np.full(n, m, np.float32) for n, m in zip(sizes, c.ssm_multipliers, strict=True)]
    )
    for t in src.tensors:
        name = t.name.replace("ffn_norm", "ffn_pre_norm") if t.name.endswith("ffn_norm") else t.name
        w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
        if t.name.endswith("ssm_dt.bias"):
            vec = mup.copy()
            if break_mup:
                vec[E + 1] *= 2  # one x row off its slice's value
            w.add_tensor(t.name.replace("ssm_dt.bias", "ssm_mup_vec"), vec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_unfolded_fork_gguf_gives_transformers_logits(hf_dir, tmp_path):
    folder = hf_dir("gated_norm")
    path = unfolded_gguf(folder, tmp_path)
    config = read_gguf(path).config
    hf = FalconH1Config.from_file(folder / "config.json")
    for field in (*MULTIPLIERS, "ssm_multipliers", "mlp_multipliers", "mamba_d_ssm",
                  "mamba_chunk_size"):  # fmt: skip
        assert getattr(config, field) == pytest.approx(getattr(hf, field), rel=1e-7), field
    ids = prompt(folder) + [7, 300, 42]
    assert (logits_of(model_of(path), ids) - hf_logits(folder, ids)).abs().max() <= 1e-4


def test_unfolded_fork_gguf_with_a_mixed_mup_vector_is_refused(hf_dir, tmp_path):
    path = unfolded_gguf(hf_dir("gated_norm"), tmp_path, break_mup=True)
    raises(path, r"blk\.0\.ssm_mup_vec is not one value per z/x/B/C/dt slice")


# ---- bad files -----------------------------------------------------------------------------


def test_malformed_files_name_the_key_or_tensor(ours, tmp_path):
    src = ours("gated_norm", "f32")
    for i, (change, patterns) in enumerate([
        (dict(drop_key="falcon-h1.ssm.state_size"),
         [r"metadata key falcon-h1\.ssm\.state_size is missing"]),
        (dict(drop_key="falcon-h1.ssm.time_step_rank"),
         [r"falcon-h1\.ssm\.time_step_rank is missing"]),
        (dict(set_key=("falcon-h1.attention.head_count_kv", 3)),
         [r"falcon-h1\.attention\.head_count 4 is not a multiple of "
          r"falcon-h1\.attention\.head_count_kv 3"]),
        (dict(set_key=("falcon-h1.ssm.time_step_rank", 7)),
         [r"falcon-h1\.ssm\.time_step_rank 7 .* does not divide falcon-h1\.ssm\.inner_size 96"]),
        (dict(set_key=("falcon-h1.ssm.group_count", 3)),
         [r"falcon-h1\.ssm\.group_count 3 does not divide falcon-h1\.ssm\.time_step_rank 8"]),
        (dict(set_key=("falcon-h1.ssm.state_size", 16)),
         [r"tensor blk\.0\.ssm_in\.weight has shape \(232, 64\), expected \(264, 64\)"]),
        (dict(reshape=("blk.1.ssm_conv1d.weight", (4, 128))),
         [r"tensor blk\.1\.ssm_conv1d\.weight has shape \(4, 128\), expected \(128, 4\)"]),
        (dict(drop_tensor="blk.1.ssm_a"), [r"no tensor blk\.1\.ssm_a; the file is incomplete"]),
        (dict(drop_tensor="blk.0.ssm_conv1d.weight"), [r"no tensor blk\.0\.ssm_conv1d\.weight"]),
    ]):  # fmt: skip
        raises(rewrite(src, tmp_path / f"bad{i}.gguf", **change), *patterns)


def test_convert_refuses_what_llama_cpp_cannot_run(tmp_path):
    for i, (changes, reason) in enumerate([
        (dict(mamba_rms_norm=True, mamba_norm_before_gate=True), "gates first"),
        (dict(time_step_limit=[0.0, 0.5]), "does not clamp the time step"),
        (dict(projectors_bias=True), "linear biases"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
         "linear RoPE scaling"),
    ]):  # fmt: skip
        folder = tmp_path / f"hf{i}"
        transformers.FalconH1Config(**{**BASE, **SHAPE, **changes}).save_pretrained(folder)
        with pytest.raises(GGUFError, match=reason):
            convert_hf_to_gguf(folder, tmp_path / "x.gguf", "f16")
        assert not (tmp_path / "x.gguf").exists()


# ---- falconet convert ----------------------------------------------------------------------


def test_convert_command_writes_the_chat_template(hf_dir, tmp_path, capsys):
    from falconet.cli import main as cli_main

    out = tmp_path / "h1.gguf"
    rc = cli_main(["convert", str(hf_dir("gated_norm")), str(out), "--type", "q8_0"])
    assert rc == 0 and capsys.readouterr().out == f"wrote {out} (q8_0)\n"
    reader = GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "falcon-h1"
    assert reader.get_field("tokenizer.chat_template").contents() == CHAT_TEMPLATE
    llm = falconet.load(out)
    assert llm.tokenizer.chat_template == CHAT_TEMPLATE
    assert llm.tokenizer.encode(CORPUS[:40]) == Tokenizer.from_dir(hf_dir("gated_norm")).encode(
        CORPUS[:40]
    )
    assert llm.card.family.startswith("Falcon-H1") and llm.card.architecture == "falcon_h1"
