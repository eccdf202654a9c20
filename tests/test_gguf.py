"""GGUF in and out: falconet's writer and reader against each other, against the HF
folder they came from, and against llama.cpp (its converter, quantizer and runtime)."""

from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from safetensors.torch import load_file

import falconet
from falconet.cli import main as cli_main
from falconet.convert import WRITE_TYPES, convert_hf_to_gguf
from falconet.models.checkpoint import load_gguf_weights, read_gguf, write_type
from falconet.models.falcon import Falcon, regroup_qkv
from falconet.models.falcon_config import FalconConfig
from falconet.quant import get_format
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import GGUFError
from tests import llama_cpp_tools
from tests.conftest import (
    CORPUS,
    EOS_ID,
    SPECIAL_TOKENS,
    build_hf_model,
    hf_config,
    memorize,
    save_hf_model,
)

T = GGMLQuantizationType
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 1234567890, 3.14159, 1,000,000 and 007 — 12345678901234",
    "punctuation!!! ?? ... ;-) (a[b]{c}) \"quotes\" 'single' `tick` $+<=>^~|",
    "東京は日本の首都です。 naïve café 🦅 👩‍👩‍👧 ✓",
    "   leading, and trailing   \n\n\ttabs\t\t and  double  spaces \r\n",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "def f(x):\n    return x * 2  # code",
    "special tokens: <|endoftext|>>>TITLE<< mid>>QUESTION<<text",
    "",
]


def write_falcon_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """A tiny BPE with Falcon's own pre-tokenizer (punctuation runs, GPT-2's byte-level
    regex, digits cut in threes), special tokens first and <|endoftext|> = 11."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation("contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated", invert=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.token_to_id("<|endoftext|>") == EOS_ID
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def memorizing_model(variant: str, ids: list[int], steps: int = 30):
    """A tiny HF Falcon trained to continue `ids`.

    Greedy tokens are only comparable across engines where each step's top two logits
    are further apart than the engines' rounding differences (llama.cpp and falconet both
    round activations to 8 bits per block, llama.cpp also keeps K/V in fp16). A random
    tiny model has near-ties (margins of 0.005 against differences of ~0.08); this one
    continues its text with margins of several logits.
    """
    return memorize(build_hf_model(variant), ids, steps)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """variant -> a tiny HF folder with a Falcon-style tokenizer (built once)."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}")
            write_falcon_tokenizer(folder, CHAT_TEMPLATE if variant == "40b" else None)
            ids = Tokenizer.from_dir(folder).encode(CORPUS)[:32]
            memorizing_model(variant, ids).save_pretrained(folder)
            if variant == "7b":
                # transformers writes num_kv_heads = num_attention_heads for multi-query
                # models, and llama.cpp's converter regroups QKV by that number. It reads
                # config.json through AutoConfig, which fills the same value in when the key
                # is absent (tiiuae/falcon-7b's config has none), so a multi-query folder
                # converts right only when it says num_kv_heads 1. falconet reads all three
                # spellings the same.
                config = json.loads((folder / "config.json").read_text())
                config["num_kv_heads"] = 1
                (folder / "config.json").write_text(json.dumps(config))
            cache[variant] = folder
        return cache[variant]

    return get


def effective(c: FalconConfig) -> tuple:
    """What a config means for the computation (HF spells the same layout several ways)."""
    return (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.kv_heads,
            c.block_layout, c.ffn_size, c.layer_norm_epsilon, c.max_position_embeddings,
            c.rope_theta, c.rope_scaling_type, c.rope_scaling_factor, c.tie_word_embeddings,
            c.alibi, c.bias, c.activation, c.bos_token_id, c.eos_token_ids)  # fmt: skip


# ---- falconet's writer -> falconet's reader ---------------------------------------------

ROUNDTRIPS = [(v, q) for v in ("7b", "40b", "11b") for q in ("f32", "bf16", "q8_0", "q4_0")]
ROUNDTRIPS += [("7b", q) for q in ("f16", "q4_1", "q5_0", "q5_1")]


@pytest.mark.parametrize("variant,qtype", ROUNDTRIPS)
def test_written_tensors_are_the_checkpoints_in_the_chosen_types(hf_dir, ours, variant, qtype):
    folder = hf_dir(variant)
    ckpt = read_gguf(ours(variant, qtype))
    config = FalconConfig.from_file(folder / "config.json")
    assert effective(ckpt.config) == effective(config)
    state = load_file(folder / "model.safetensors")
    kind = WRITE_TYPES[qtype][0]
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    assert set(ckpt.tensors) == set(state) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    for hf_name, t in ckpt.tensors.items():
        w = state[hf_name]
        if "query_key_value" in hf_name and config.kv_heads != 1:
            w = regroup_qkv(w, config)  # GGUF's "jploski" QKV layout is falconet's own
        want = write_type(hf_name, tuple(w.shape), kind, config)
        if w.ndim == 1:
            assert want == T.F32
        elif kind in (T.F32, T.F16, T.BF16, T.Q8_0) or t.name != head:
            assert want == kind
        else:
            assert want == T.Q8_0  # llama.cpp's rule for Falcon's head in 4/5-bit files
        assert t.tensor_type == want, t.name
        expected = get_format(want).quantize(w.float().numpy())
        assert np.array_equal(
            np.asarray(t.data).view(np.uint8).reshape(-1), expected.reshape(-1)
        ), t.name


@pytest.mark.parametrize("variant", ["7b", "40b", "11b"])
def test_f32_gguf_gives_the_hf_folders_logits(hf_dir, ours, variant):
    from_gguf = falconet.load(ours(variant, "f32"))
    from_hf = falconet.load(hf_dir(variant), dtype="float32")
    ids = from_hf.tokenizer.encode(TEXTS[0] + TEXTS[3])
    assert torch.equal(from_gguf.logits(ids), from_hf.logits(ids))
    assert from_gguf.generate(ids, max_tokens=8, ignore_eos=True) == from_hf.generate(
        ids, max_tokens=8, ignore_eos=True
    )


def test_blocks_and_f32_tensors_are_used_in_place(ours):
    """Q4_0 blocks and F32 norms point into the file's memory map; nothing is copied."""
    ckpt = read_gguf(ours("40b", "q4_0"))
    with torch.device("meta"):
        model = Falcon(ckpt.config, torch.float32)
    load_gguf_weights(model, ckpt)
    block = model.transformer.h[0]
    for hf_name, value in [
        ("transformer.h.0.mlp.dense_h_to_4h.weight", block.mlp.dense_h_to_4h.weight_blocks),
        ("transformer.h.0.ln_attn.weight", block.ln_attn.weight),
    ]:
        assert value.data_ptr() == ckpt.tensors[hf_name].data.ctypes.data
    seen = []
    falconet.load(ours("40b", "q4_0"), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (ckpt.nbytes, ckpt.nbytes) and len(seen) == len(ckpt.tensors)


@pytest.mark.parametrize("pre", ["falcon", "gpt-2"])
def test_tokenizer_rebuilt_from_metadata_matches_tokenizer_json(hf_dir, ours, tmp_path, pre):
    if pre == "falcon":
        folder, path = hf_dir("40b"), ours("40b", "q8_0")
    else:  # conftest's tokenizer: GPT-2's byte-level regex alone, as `falconet train` makes
        folder = save_hf_model(build_hf_model("7b"), tmp_path / "hf")
        path = tmp_path / "gpt2.gguf"
        convert_hf_to_gguf(folder, path, "q8_0")
    assert GGUFReader(path).get_field("tokenizer.ggml.pre").contents() == pre
    ref, got = Tokenizer.from_dir(folder), Tokenizer(**read_gguf(path).vocab)
    for text in TEXTS:
        ids = ref.encode(text)
        assert got.encode(text) == ids, text
        assert got.decode(ids) == ref.decode(ids)
        assert got.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    assert (got.eos_token_ids, got.bos_token_id) == (ref.eos_token_ids, ref.bos_token_id)
    assert got.special_token_ids == ref.special_token_ids
    assert got.chat_template == ref.chat_template
    assert all(got.id_to_token(i) == ref.id_to_token(i) for i in range(ref.vocab_size))


# ---- falconet's GGUF in llama.cpp ----------------------------------------------------------


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of `ids`, and its logits at the last prompt token."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    with contextlib.closing(
        llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ) as m:
        m.eval(ids)
        last = np.array(m.scores[m.n_tokens - 1])
        out = []
        for _ in range(n):
            out.append(int(np.argmax(m.scores[m.n_tokens - 1])))
            m.eval(out[-1:])
    return out, last


def falconet_greedy(path: Path, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm = falconet.load(path)
    tokens = llm.complete([ids], max_tokens=n, temperature=0.0, ignore_eos=True)[0].token_ids
    return tokens, llm.logits(ids)[-1].numpy()


def prompt(folder: Path) -> list[int]:
    return Tokenizer.from_dir(folder).encode(CORPUS[:19])  # "The quick brown fox"


@pytest.mark.parametrize(
    "variant,qtype",
    [("7b", "q4_0"), ("7b", "q8_0"), ("40b", "q4_0"), ("40b", "q8_0"), ("11b", "q4_0")],
)
def test_llama_cpp_runs_falconets_gguf(hf_dir, ours, variant, qtype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, ids = ours(variant, qtype), prompt(hf_dir(variant))
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, 16)
    tokens, logits = falconet_greedy(path, ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()


# ---- llama.cpp's GGUF in falconet ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_files(hf_dir, tmp_path_factory):
    """variant -> {type: path} of GGUFs made by llama.cpp: its converter (f32), then its
    quantizer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llama_cpp_tools.llama_cpp_dir() is None:
        pytest.skip("no llama.cpp checkout with convert_hf_to_gguf.py (set FALCONET_LLAMA_CPP_DIR)")
    out = tmp_path_factory.mktemp("llama_cpp")
    variants = ("7b", "40b")
    llama_cpp_tools.convert([(hf_dir(v), out / f"{v}-f32.gguf") for v in variants])
    files = {}
    for v in variants:
        files[v] = {"F32": out / f"{v}-f32.gguf"}
        for q in ("Q4_0", "Q8_0", "Q4_K_M"):
            files[v][q] = out / f"{v}-{q}.gguf"
            llama_cpp_tools.quantize(files[v]["F32"], files[v][q], f"MOSTLY_{q}")
    return files


@pytest.mark.parametrize("variant", ["7b", "40b"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_llama_cpp_gguf_runs_in_falconet(hf_dir, llama_cpp_files, variant, qtype):
    path, ids = llama_cpp_files[variant][qtype], prompt(hf_dir(variant))
    ref_tokens, ref_logits = llama_cpp_greedy(path, ids, 16)
    tokens, logits = falconet_greedy(path, ids, 16)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 0.03 * np.abs(ref_logits).max()
    if qtype == "Q4_K_M":  # Falcon's K-quant mix: K-quants on ffn_down, fallbacks elsewhere
        types = {t.tensor_type for t in GGUFReader(path).tensors}
        assert types & {T.Q4_K, T.Q5_K, T.Q6_K} and types & {T.Q5_0, T.Q5_1}


@pytest.mark.parametrize("variant", ["7b", "40b"])
@pytest.mark.parametrize("qtype", ["f32", "q4_0", "q8_0"])
def test_falconets_gguf_tensors_equal_llama_cpps(llama_cpp_files, ours, variant, qtype):
    """Same names, types and bytes as llama.cpp's converter + quantizer produce."""
    theirs = GGUFReader(llama_cpp_files[variant][qtype.upper()])
    mine = {t.name: t for t in GGUFReader(ours(variant, qtype)).tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine[t.name].data), np.asarray(t.data)), t.name
    for key in ("falcon.attention.head_count_kv", "falcon.feed_forward_length", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):  # fmt: skip
        assert (
            GGUFReader(ours(variant, qtype)).get_field(key).contents()
            == theirs.get_field(key).contents()
        )


# ---- bad files ---------------------------------------------------------------------------


def rewrite(src: Path, dst: Path, arch: str | None = None, drop_key: str | None = None,
            drop_tensor: str | None = None, retype: tuple[str, T] | None = None,
            reshape: tuple[str, tuple[int, int]] | None = None,
            set_key: tuple[str, str] | None = None, big_endian: bool = False) -> Path:  # fmt: skip
    """Copy a GGUF with one thing changed."""
    r = GGUFReader(src)
    order = GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE
    w = GGUFWriter(dst, arch or r.get_field("general.architecture").contents(), endianess=order)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", drop_key):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        value = set_key[1] if set_key and key == set_key[0] else f.contents()
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    for t in r.tensors:
        data, kind = np.asarray(t.data), t.tensor_type
        if t.name == drop_tensor:
            continue
        if retype and t.name == retype[0]:
            kind = retype[1]
            rows, cols = data.shape
            data = np.zeros((rows, cols // 256 * get_block_bytes(kind)), np.uint8)
        if reshape and t.name == reshape[0]:
            data = np.zeros(reshape[1], np.float32)
        w.add_tensor(t.name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def get_block_bytes(kind: T) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[kind][1]


def raises(path: Path, *patterns: str) -> None:
    with pytest.raises(GGUFError) as info:
        falconet.load(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    for p in patterns:
        assert re.search(p, msg), msg


def test_truncated_files(ours, tmp_path):
    data = ours("7b", "f32").read_bytes()
    for n, patterns in [
        (2, ["truncated"]),
        (200, ["truncated", "header is cut off"]),
        (len(data) - 1000, ["truncated", r"tensor \S+ is cut off", "download or convert it again"]),
    ]:
        path = tmp_path / f"cut{n}.gguf"
        path.write_bytes(data[:n])
        raises(path, *patterns)
    (tmp_path / "empty.gguf").write_bytes(b"")
    raises(tmp_path / "empty.gguf", "truncated")


@pytest.mark.parametrize(
    "name, header, pattern",
    [  # headers that claim absurd sizes must fail fast, without trying to allocate them
        ("counts", b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62), "truncated"),
        ("string", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**60) + b"abc", "truncated"),
        ("array", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 3) + b"abc"
         + struct.pack("<IIQ", 9, 4, 2**61), "truncated"),
        ("version", b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "version 9"),
    ],
)  # fmt: skip
def test_hostile_headers(tmp_path, name, header, pattern):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(header)
    raises(path, pattern)


def test_not_a_gguf_file(ours, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + ours("7b", "f32").read_bytes()[4:])
    raises(path, "not a GGUF file")


def test_bad_contents(ours, tmp_path):
    src = ours("7b", "f32")
    raises(rewrite(src, tmp_path / "a.gguf", arch="gpt2"),
           r"architecture 'gpt2' is not one falconet runs \(falcon, llama, falcon-h1, mamba\)")  # fmt: skip
    # llama is an architecture falconet runs (Falcon3); a falcon file labelled so is not one
    raises(rewrite(src, tmp_path / "a2.gguf", arch="llama"), r"metadata key llama\.\S+ is missing")
    # (IQ4_XS: a 256-value type falconet has no kernels or decoder for)
    raises(rewrite(src, tmp_path / "b.gguf", retype=("blk.0.ffn_down.weight", T.IQ4_XS)),
           r"tensor blk\.0\.ffn_down\.weight has type IQ4_XS", "Q4_0", "Q6_K")  # fmt: skip
    raises(rewrite(src, tmp_path / "c.gguf", drop_tensor="blk.1.ffn_up.weight"),
           r"no tensor blk\.1\.ffn_up\.weight")  # fmt: skip
    raises(rewrite(src, tmp_path / "d.gguf", drop_key="falcon.block_count"),
           r"metadata key falcon\.block_count is missing")  # fmt: skip
    raises(rewrite(src, tmp_path / "e.gguf", reshape=("blk.0.ffn_up.weight", (128, 64))),
           r"tensor blk\.0\.ffn_up\.weight has shape \(128, 64\), expected \(256, 64\)")  # fmt: skip
    raises(rewrite(src, tmp_path / "g.gguf", set_key=("tokenizer.ggml.pre", "llama-bpe")),
           "tokenizer.ggml.pre is 'llama-bpe'")  # fmt: skip
    raises(rewrite(src, tmp_path / "h.gguf", big_endian=True), "big-endian")
    # Every block must have the layout block 0 has.
    raises(rewrite(ours("40b", "f32"), tmp_path / "f.gguf", drop_tensor="blk.1.attn_norm_2.weight"),
           r"blk\.1\.attn_norm_2\.weight")  # fmt: skip


# ---- falconet convert ------------------------------------------------------------------------


def cli(*args: str, capsys) -> tuple[int, str, str]:
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_convert_command(hf_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    rc, stdout, _ = cli("convert", str(hf_dir("40b")), str(out), "--type", "q4_0", capsys=capsys)
    assert rc == 0 and stdout == f"wrote {out} (q4_0)\n"
    assert read_gguf(out).config.num_kv_heads == 2
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind
    for args, pattern in [
        ((str(tmp_path / "nope"), str(tmp_path / "x.gguf")), "not a folder"),
        ((str(hf_dir("40b")), str(out)), "already exists; pass --overwrite"),
        ((str(hf_dir("40b")), str(tmp_path / "no" / "x.gguf")), "does not exist"),
        ((str(hf_dir("40b")), str(tmp_path / "x.gguf"), "--type", "q3_k"), "invalid choice"),
        ((str(hf_dir("40b")), str(tmp_path)), "is a folder"),
    ]:
        rc, stdout, err = cli("convert", *args, capsys=capsys)
        assert rc == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("falconet: error:") and pattern in err, err
    before = out.read_bytes()
    assert cli("convert", str(hf_dir("40b")), str(out), "--overwrite", capsys=capsys)[0] == 0
    assert out.read_bytes() != before and read_gguf(out).config.torch_dtype == "float16"


@pytest.mark.parametrize("variant,reason", [("rw", "ALiBi"), ("mha_rotary_bias", "biases"),
                                            ("7b_rope_dynamic", "dynamic RoPE")])  # fmt: skip
def test_convert_refuses_what_llama_cpp_cannot_run(tmp_path, variant, reason):
    hf_config(variant).save_pretrained(tmp_path / "hf")  # refused from config.json alone
    with pytest.raises(GGUFError, match=reason):
        convert_hf_to_gguf(tmp_path / "hf", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_convert_sets_head_and_embedding_types_as_llama_quantize(hf_dir, tmp_path, capsys):
    """--output-tensor-type / --token-embedding-type, llama-quantize's flags: a tied head
    is the embeddings, so the first sets token_embd, and the second wins over it; the
    other matrices keep --type's. Bad values: a clear one-line error, no file."""
    out = tmp_path / "m.gguf"
    rc, _, err = cli("convert", str(hf_dir("7b")), str(out), "--type", "q4_0",
                     "--output-tensor-type", "f16", capsys=capsys)  # fmt: skip
    assert rc == 0, err
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == "F16"
    assert kinds["blk.0.ffn_up.weight"] == "Q4_0"
    rc, _, err = cli("convert", str(hf_dir("7b")), str(out), "--type", "q4_0", "--overwrite",
                     "--output-tensor-type", "f16", "--token-embedding-type", "q8_0",
                     capsys=capsys)  # fmt: skip
    assert rc == 0, err
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.ffn_up.weight"] == "Q4_0"
    done = falconet.load(out).complete(["the"], max_tokens=2, ignore_eos=True)
    assert len(done[0].token_ids) == 2
    bad = tmp_path / "bad.gguf"
    for flag, value, pattern in [
        ("--output-tensor-type", "q6_k", "token_embd.weight: rows of 64 values do not split"),
        ("--token-embedding-type", "tq2_0", "invalid choice"),
        ("--output-tensor-type", "q9_0", "invalid choice"),
    ]:
        rc, stdout, err = cli("convert", str(hf_dir("7b")), str(bad), flag, value, capsys=capsys)
        assert rc != 0 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("falconet: error:") and pattern in err, err
        assert not bad.exists()
