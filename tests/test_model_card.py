"""The model card: family from the architecture and config, licence from README.md front
matter or GGUF general.license*, shown by `falconet info` and at every load, carried
through `falconet convert`; never read from a file or folder name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import falconet
from falconet.cli import main as cli_main
from falconet.models.card import (
    FRONT_MATTER_MAX_BYTES,
    GGUF_LICENCE_KEYS,
    Licence,
    family_name,
    read_front_matter,
    read_licence,
)
from falconet.models.registry import config_from_hf
from falconet.weights.gguf import metadata_strings
from tests.conftest import (
    VARIANTS,
    build_falcon_h1_hf_model,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    hf_config,
    save_hf_model,
)

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}

TII_LINK = "https://falconllm.tii.ae/falcon-terms-and-conditions.html"
APACHE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- falcon\n---\n\n# Falcon\n"
FALCON_LLM_CARD = (
    "---\n"
    "language:\n  - en\n  - fr\n"
    "tags:\n- falcon3\n"
    "license: other\n"
    "license_name: falcon-llm-license\n"
    f"license_link: {TII_LINK}\n"
    "library_name: transformers\n"
    "---\n\n# Falcon3-7B-Instruct\n"
)


def falconet_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falconet", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)  # fmt: skip


def card_file(tmp_path: Path, content: str | bytes) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "README.md"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return tmp_path


@pytest.fixture(scope="module")
def hf_7b(tmp_path_factory) -> Path:
    """A tiny Falcon 7B-style folder (rotary: llama.cpp's falcon can run it) with no card."""
    return save_hf_model(build_hf_model("7b"), tmp_path_factory.mktemp("f7b") / "model")


def with_card(folder: Path, dst: Path, card: str | None) -> Path:
    """A copy of `folder` (its files linked) with `card` as README.md."""
    dst.mkdir(parents=True)
    for f in folder.iterdir():
        (dst / f.name).symlink_to(f)
    if card is not None:
        (dst / "README.md").write_text(card, encoding="utf-8")
    return dst


# ---- the licence a card declares ------------------------------------------------------------


def test_apache_card(tmp_path):
    licence = read_licence(card_file(tmp_path, APACHE_CARD))
    assert licence == Licence("apache-2.0", None, None, "README.md front matter")
    assert str(licence) == "apache-2.0 (Apache-2.0) [README.md front matter]"
    assert licence.gguf_metadata() == {"general.license": "apache-2.0"}


def test_other_with_falcon_llm_license_name_and_link(tmp_path):
    licence = read_licence(card_file(tmp_path, FALCON_LLM_CARD))
    assert (licence.id, licence.name, licence.link) == ("other", "falcon-llm-license", TII_LINK)
    assert str(licence) == (
        f"falcon-llm-license (Falcon-LLM License), {TII_LINK} [README.md front matter]"
    )
    assert licence.gguf_metadata() == {
        "general.license": "other",
        "general.license.name": "falcon-llm-license",
        "general.license.link": TII_LINK,
    }


def test_falcon_180b_card_name_and_quoted_values(tmp_path):
    card = (
        "\ufeff---\r\n"  # a BOM and CRLF line ends, as Windows editors write
        "license: 'unknown'  # the Hub's value for a custom licence\r\n"
        'license_name: "falcon-180b-tii-license"\r\n'
        "extra_gated_prompt: >\r\n  You agree to the licence.\r\n"
        "---\r\n"
    )
    licence = read_licence(card_file(tmp_path, card))
    assert (licence.id, licence.name, licence.link) == ("unknown", "falcon-180b-tii-license", None)
    assert str(licence) == "falcon-180b-tii-license [README.md front matter]"


@pytest.mark.parametrize(
    "content",
    [
        "# Falcon\n\nLicensed under the Apache License 2.0.\n",  # no front matter
        "---\nlicense: apache-2.0\n",  # unterminated
        "---\nlicense: apache-2.0\nlicense: mit\n---\n",  # a repeated key
        "---\nlicense apache-2.0\n---\n",  # not key: value
        "---\nlicense: [apache-2.0]\n---\n",  # a flow list, not a scalar
        "---\nlicense: null\n---\n",
        '---\nlicense: "apache\\u002d2.0"\n---\n',  # an escape this reader does not decode
        "---\nlicense: 'apache-2.0\n---\n",  # an unterminated quote
        "---\nlicense: \x1b[31mapache-2.0\x1b[0m\n---\n",  # a terminal escape sequence
        "---\nlicense: Apache License, version 2.0, or whatever\n---\n",  # prose, not an id
        "---\nlicense_link: javascript:alert(1)\n---\n",
        "",
    ],
)
def test_undeclared_or_malformed_front_matter(tmp_path, content):
    assert read_licence(card_file(tmp_path, content)) == Licence()
    assert str(Licence()) == "not declared"


def test_binary_and_huge_cards(tmp_path):
    binary = b"---\nlicense: apache-2.0\n\xff\xfe\x00\x01binary\n---\n"  # not UTF-8
    assert read_licence(card_file(tmp_path / "a", binary)) == Licence()
    assert read_front_matter(card_file(tmp_path / "b", b"\x00" * 4096) / "README.md") == {}
    # front matter closed past the read limit counts as unterminated: the limit holds
    long = (
        "---\n"
        + "tags: x\n"
        + "# padding\n" * (FRONT_MATTER_MAX_BYTES // 10)
        + "license: mit\n---\n"
    )
    assert read_licence(card_file(tmp_path / "c", long)) == Licence()
    # a card far larger than the limit, with its front matter at the top, still declares
    huge = APACHE_CARD + "lorem ipsum " * (4 * FRONT_MATTER_MAX_BYTES)
    assert read_licence(card_file(tmp_path / "d", huge)).id == "apache-2.0"
    # a README that is a folder, or no README at all
    (tmp_path / "e" / "README.md").mkdir(parents=True)
    assert read_licence(tmp_path / "e") == Licence()
    assert read_licence(tmp_path / "missing") == Licence()


def test_names_never_declare_a_licence(hf_7b, tmp_path):
    """A folder and files named like licences, with no declaration: not declared."""
    folder = with_card(hf_7b, tmp_path / "falcon-180b-apache-2.0", "# falcon-180b apache-2.0\n")
    (folder / "LICENSE-apache-2.0.txt").write_text("Apache License\nVersion 2.0\n")
    (folder / "falcon-180b-tii-license.txt").write_text("TII Falcon 180B license\n")
    llm = falconet.load(folder)
    assert llm.card.licence == Licence()
    assert llm.card.family == "Falcon 7B-style multi-query"  # from config.json, not the name


# ---- the family a config describes ------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, family",
    [
        ("rw", "Falcon-RW (rw-1b/rw-7b: ALiBi)"),
        ("7b", "Falcon 7B-style multi-query"),
        ("40b", "Falcon 40B/180B-style grouped KV (2 kv heads, two norms)"),
        ("11b", "Falcon2-11B-style grouped KV (2 kv heads, one norm)"),
        ("mha_rotary_bias", "Falcon (multi-head attention, rotary)"),
    ],
)
def test_falcon_families(variant, family):
    assert variant in VARIANTS
    assert family_name(config_from_hf(hf_config(variant).to_dict())) == family


def test_llama_is_falcon3(tmp_path):
    folder = save_hf_model(build_llama_hf_model("falcon3_shape"), tmp_path / "m")
    card_file(folder, FALCON_LLM_CARD)
    llm = falconet.load(folder)
    assert (llm.card.family, llm.card.architecture) == ("Falcon3 (Llama architecture)", "llama")
    assert llm.card.family_source == "config.json"
    assert llm.card.licence.name == "falcon-llm-license"
    res = falconet_cli("info", "--model", str(folder))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(
        line.startswith("family ") and line.endswith("Falcon3 (Llama architecture) [config.json: llama]")
        for line in lines
    ), res.stdout  # fmt: skip
    assert f"falcon-llm-license (Falcon-LLM License), {TII_LINK} [README.md front matter]" in [
        line.split(None, 1)[1] for line in lines if line.startswith("licence ")
    ]


def test_falcon_mamba_family_and_info(tmp_path):
    folder = save_hf_model(build_falcon_mamba_hf_model("conv4_tied"), tmp_path / "m")
    llm = falconet.load(folder)
    assert (llm.card.family, llm.card.architecture) == (
        "Falcon-Mamba (Mamba-1, state-space)",
        "falcon_mamba",
    )
    res = falconet_cli("info", "--model", str(folder))
    assert res.returncode == 0, res.stderr
    # `key  value` rows, keys padded to one width (keys hold single spaces)
    rows = dict(line.split("  ", 1) for line in res.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    # 3 layers x 96 channels x (3 conv inputs + 5 states) x 4 bytes, whatever the length
    assert rows["state per sequence"].startswith("9,216 bytes, whatever the length")
    assert "KV cache per token" not in rows
    assert rows["family"] == "Falcon-Mamba (Mamba-1, state-space) [config.json: falcon_mamba]"


def test_falcon_h1_family_and_info(tmp_path):
    """A hybrid: KV bytes per token for its attention and a fixed state per sequence."""
    folder = save_hf_model(build_falcon_h1_hf_model("gate_then_norm"), tmp_path / "h1")
    llm = falconet.load(folder)
    assert llm.card.architecture == "falcon_h1"
    res = falconet_cli("info", "--model", str(folder))
    assert res.returncode == 0, res.stderr
    rows = dict(line.split("  ", 1) for line in res.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["family"] == (
        "Falcon-H1 (hybrid: attention and Mamba-2 in every layer) [config.json: falcon_h1]"
    )
    # 2 layers x 2 kv heads x head_dim 10 x K and V x 4 bytes
    assert rows["KV cache per token"].startswith("320 bytes (2x smaller than full MHA)")
    # 2 layers x (conv 56 channels x 3 inputs + 4 heads x 6 x 8 states) x 4 bytes
    assert rows["state per sequence"].startswith(f"{2 * (56 * 3 + 4 * 6 * 8) * 4:,} bytes")
    assert rows["mamba heads / d_head / groups / state"] == "4 / 6 / 2 / 8"
    assert rows["context (max_position_embeddings)"] == "256"


# ---- shown by the CLI ------------------------------------------------------------------------


def test_info_and_load_line(hf_7b, tmp_path):
    folder = with_card(hf_7b, tmp_path / "apache", APACHE_CARD)
    info = falconet_cli("info", "--model", str(folder))
    assert info.returncode == 0, info.stderr
    rows = {line.split("  ", 1)[0]: line.split(None, 1)[1] for line in info.stdout.splitlines()}
    assert rows["family"] == "Falcon 7B-style multi-query [config.json: falcon]"
    assert rows["licence"] == "apache-2.0 (Apache-2.0) [README.md front matter]"
    bare = falconet_cli("info", "--model", str(hf_7b))
    assert bare.returncode == 0, bare.stderr
    assert any(
        line.split(None, 1) == ["licence", "not declared"] for line in bare.stdout.splitlines()
    )
    gen = falconet_cli("generate", "Hi", "--model", str(folder), "--max-tokens", "2")
    assert gen.returncode == 0, gen.stderr
    assert (
        f"falconet: {folder}: family Falcon 7B-style multi-query; "
        "licence apache-2.0 (Apache-2.0) [README.md front matter]"
    ) in gen.stderr.splitlines()


# ---- through GGUF --------------------------------------------------------------------------


def test_convert_carries_the_licence_into_gguf(hf_7b, tmp_path, capsys):
    folder = with_card(hf_7b, tmp_path / "f3", FALCON_LLM_CARD)
    out = tmp_path / "model.gguf"
    assert cli_main(["convert", str(folder), str(out), "--type", "q8_0"]) == 0
    capsys.readouterr()
    reader = GGUFReader(out)
    assert {k: reader.get_field(k).contents() for k in GGUF_LICENCE_KEYS} == {
        "general.license": "other",
        "general.license.name": "falcon-llm-license",
        "general.license.link": TII_LINK,
    }
    hf_card, gguf_card = falconet.load(folder).card, falconet.load(out).card
    assert gguf_card.family == hf_card.family == "Falcon 7B-style multi-query"
    assert gguf_card.family_source == "GGUF general.architecture"
    assert (gguf_card.licence.id, gguf_card.licence.name, gguf_card.licence.link) == (
        hf_card.licence.id, hf_card.licence.name, hf_card.licence.link,
    )  # fmt: skip
    assert gguf_card.licence.source == "GGUF general.license"
    info = falconet_cli("info", "--model", str(out))
    assert info.returncode == 0, info.stderr
    assert f"falcon-llm-license (Falcon-LLM License), {TII_LINK} [GGUF general.license]" in (
        info.stdout
    )
    # a folder without a card writes no licence keys, and the GGUF declares none
    bare = tmp_path / "bare.gguf"
    assert cli_main(["convert", str(hf_7b), str(bare), "--type", "q8_0"]) == 0
    assert all(GGUFReader(bare).get_field(k) is None for k in GGUF_LICENCE_KEYS)
    assert falconet.load(bare).card.licence == Licence()


def test_gguf_licence_keys_of_the_wrong_type_are_undeclared(tmp_path):
    path = tmp_path / "meta.gguf"
    w = GGUFWriter(path, "falcon")
    w.add_key_value("general.license", 2, GGUFValueType.UINT32)
    w.add_key_value("general.license.name", ["a", "b"], GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.STRING)  # fmt: skip
    w.add_key_value("general.license.link", TII_LINK, GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = metadata_strings(GGUFReader(path), GGUF_LICENCE_KEYS)
    assert got == {"general.license.link": TII_LINK}
    from falconet.models.card import gguf_licence

    assert gguf_licence(got) == Licence()  # a link alone declares no licence
