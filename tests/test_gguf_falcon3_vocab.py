"""Falcon3's tokenizer in GGUF (tokenizer.ggml.pre = "falcon3"), both ways: a tiny BPE
with the pre-tokenizer of tiiuae/Falcon3-*'s tokenizer.json, written by `falconet
convert`, read back by falconet and by llama.cpp, against the tokenizer.json itself
(through transformers) as the reference."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from gguf import GGUFReader

import falconet
from falconet.cli import main as cli_main
from falconet.convert import convert_hf_to_gguf
from falconet.errors import CheckpointError
from falconet.tokenizer import Tokenizer
from tests.conftest import CORPUS, EOS_ID, SPECIAL_TOKENS
from tests.test_gguf import TEXTS, falconet_greedy, llama_cpp_greedy, prompt, raises, rewrite
from tests.test_gguf_llama import memorizing_model

# The Split regex of Falcon3's (and Llama 3's) tokenizer.json, spelled as that file has it.
FALCON3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

# test_gguf's texts, and what this pre-tokenizer cuts differently from Falcon's: digit
# runs in threes from the left, symbol runs with trailing newlines, contractions in any
# case, one non-letter glued to the next word, whitespace runs before a word.
FALCON3_TEXTS = TEXTS + [
    "12345 678 9 1234567 3.3 3..3 3...3 a1b22c333d4444",
    '!!!??? ...\n\n--==>> $x+y=z; ```code``` """doc"""',
    "DON'T I'M WE'LL you'D they'Re it's",
    "line one\nline two\r\n\n   indented\n\t\ttabbed  \n \n",
    "naïve Ünïcödé – Ελληνικά русский 日本語 🦅🦅 ✓✓",
    "(x)[y]{z} @user #tag 50% $100 1/2",
]


def write_falcon3_tokenizer(folder: Path, ignore_merges: bool) -> None:
    """A tiny byte-level BPE with Falcon3's pre-tokenizer, special tokens first and
    <|endoftext|> = 11 (as in Falcon3's vocabulary)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(FALCON3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.token_to_id("<|endoftext|>") == EOS_ID
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_tokenizer_json(folder: Path, edit) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    edit(spec)
    (folder / "tokenizer.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def falcon3(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Falcon3-shaped HF folder with that tokenizer, and the q8_0 GGUF `falconet
    convert` writes of it."""
    folder = tmp_path_factory.mktemp("hf_falcon3")
    write_falcon3_tokenizer(folder, ignore_merges=True)
    ids = Tokenizer.from_dir(folder).encode(CORPUS)[:32]
    memorizing_model("falcon3_shape", ids).save_pretrained(folder)
    out = tmp_path_factory.mktemp("gguf") / "falcon3-q8_0.gguf"
    assert cli_main(["convert", str(folder), str(out), "--type", "q8_0"]) == 0
    return folder, out


def hf_ids(folder: Path, texts: list[str] = FALCON3_TEXTS) -> list[list[int]]:
    """The reference: transformers' fast tokenizer on the folder's tokenizer.json."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    return [hf.encode(text) for text in texts]


def test_converted_file_names_falcon3(falcon3):
    _, path = falcon3
    assert GGUFReader(path).get_field("tokenizer.ggml.pre").contents() == "falcon3"


def test_falconet_reads_falcon3_tokenizer_as_tokenizer_json(falcon3):
    folder, path = falcon3
    got = falconet.load(path).tokenizer
    for text, ids in zip(FALCON3_TEXTS, hf_ids(folder), strict=True):
        assert got.encode(text) == ids, text
        assert got.decode(ids) == Tokenizer.from_dir(folder).decode(ids), text


def test_llama_cpp_tokenizes_falcon3_file_as_tokenizer_json(falcon3):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, path = falcon3
    with contextlib.closing(
        llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ) as m:
        for text, ids in zip(FALCON3_TEXTS, hf_ids(folder), strict=True):
            assert m.tokenize(text.encode(), add_bos=False, special=True) == ids, text


def test_llama_cpp_and_falconet_agree_on_falcon3_file(falcon3):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, path = falcon3
    ids = prompt(folder)
    assert llama_cpp_greedy(path, ids, 16)[0] == falconet_greedy(path, ids, 16)[0]


def test_ignore_merges_as_llama_cpp_applies_it(falcon3, tmp_path):
    """llama.cpp emits a "falcon3" pre-token that is a vocabulary token as that token
    without merging (ignore_merges). A token no merge builds shows it: with the flag on
    in tokenizer.json, HF, falconet and llama.cpp give it whole; with it off, HF would
    split it, so convert refuses."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, _ = falcon3
    folder = copy_folder(src, tmp_path / "hf")
    new_id = 400  # past the trained vocabulary, below the model's 448 rows
    edit_tokenizer_json(folder, lambda spec: spec["model"]["vocab"].update({"Ġzq": new_id}))
    out = tmp_path / "zq.gguf"
    convert_hf_to_gguf(folder, out, "q8_0")
    text = "a zq b"
    (ids,) = hf_ids(folder, [text])
    assert new_id in ids
    assert falconet.load(out).tokenizer.encode(text) == ids
    with contextlib.closing(
        llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    ) as m:
        assert m.tokenize(text.encode(), add_bos=False, special=True) == ids

    edit_tokenizer_json(folder, lambda spec: spec["model"].update(ignore_merges=False))
    assert new_id not in hf_ids(folder, [text])[0]
    with pytest.raises(CheckpointError, match=r"token 'Ġzq' is not what merging its text gives"):
        convert_hf_to_gguf(folder, tmp_path / "refused.gguf", "q8_0")
    assert not (tmp_path / "refused.gguf").exists()


def test_flag_off_is_accepted_where_it_changes_nothing(falcon3, tmp_path):
    """Every token of the trained vocabulary is what merging its text gives, so a
    tokenizer.json with ignore_merges off encodes as llama.cpp's "falcon3" does."""
    src, _ = falcon3
    folder = copy_folder(src, tmp_path / "hf")
    edit_tokenizer_json(folder, lambda spec: spec["model"].update(ignore_merges=False))
    out = tmp_path / "off.gguf"
    convert_hf_to_gguf(folder, out, "q8_0")
    got = falconet.load(out).tokenizer
    for text, ids in zip(FALCON3_TEXTS, hf_ids(folder), strict=True):
        assert got.encode(text) == ids, text


@pytest.mark.parametrize("name", ["falcon3 ", "Falcon3", "falcon-3", "llama3", ""])
def test_other_pre_tokenizer_names_are_refused(falcon3, tmp_path, name):
    _, src = falcon3
    raises(rewrite(src, tmp_path / "x.gguf", set_key=("tokenizer.ggml.pre", name)),
           f"tokenizer.ggml.pre is {name!r}; falconet rebuilds the 'falcon', 'gpt-2', 'falcon3'")  # fmt: skip


def test_convert_refuses_a_near_falcon3_pre_tokenizer(falcon3, tmp_path):
    """llama.cpp knows pre-tokenizers by name, so one that only resembles Falcon3's (digit
    runs of four) has no name to write."""
    src, _ = falcon3
    folder = copy_folder(src, tmp_path / "hf")

    def digits_in_fours(spec):
        split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]
        split["Regex"] = split["Regex"].replace("{1,3}", "{1,4}")

    edit_tokenizer_json(folder, digits_in_fours)
    rc = cli_main(["convert", str(folder), str(tmp_path / "x.gguf")])
    assert rc != 0 and not (tmp_path / "x.gguf").exists()
    with pytest.raises(CheckpointError, match="not Falcon's, Falcon3's or GPT-2's"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf", "q8_0")
