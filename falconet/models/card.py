"""What a checkpoint declares about itself: its model family and its licence.

Falcon generations come under different licences (Falcon 1: Apache-2.0; Falcon-180B: its
own TII licence; Falcon2, Falcon3, Falcon-H1: TII's Falcon licences), so `falconet info`
and every load say which one the checkpoint declares. Both facts are read, never guessed:

- the family from the architecture (registry.py: config.json `model_type`, or GGUF
  `general.architecture`) and the config's own fields (ALiBi, multi-query, the norms);
- the licence from the model card's YAML front matter (README.md: `license`,
  `license_name`, `license_link`, as the Hugging Face Hub reads them), or from a GGUF
  file's `general.license`, `general.license.name`, `general.license.link` (the keys
  llama.cpp's converter fills from the same front matter).

No file or folder name is ever read for either: a folder called "falcon-180b-apache"
with no declaration has licence "not declared".

The front matter is read by a small strict reader of top-level `key: value` scalars
(falconet does not depend on a YAML library), over at most FRONT_MATTER_MAX_BYTES of the
file. Anything it does not understand leaves the licence "not declared"; it never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from falconet.models.falcon_config import FalconConfig
from falconet.models.registry import ModelConfig, for_config

CARD_FILE = "README.md"
# Model cards put the front matter first; 64 KiB holds any real one many times over, and
# bounds what a hostile or huge README costs to read.
FRONT_MATTER_MAX_BYTES = 64 * 1024

# GGUF keys (llama.cpp's gguf-py Keys.General) <-> front-matter keys.
GGUF_LICENCE_KEYS = {
    "general.license": "license",
    "general.license.name": "license_name",
    "general.license.link": "license_link",
}

# Titles for the declared ids the Falcon family uses; any other id is shown as declared.
LICENCE_TITLES = {
    "apache-2.0": "Apache-2.0",
    "falcon-llm-license": "Falcon-LLM License",
}

# What a declared value may look like. Values end up on a terminal and in GGUF files, so
# anything else (control characters, escape sequences, prose) is treated as undeclared.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,99}")
_LINK_RE = re.compile(r"https?://[!-~]{1,500}")  # printable ASCII, no spaces
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Licence:
    """A declared licence: HF's `license` id (e.g. apache-2.0, or `other` with a
    `name` such as falcon-llm-license) and link, and where the declaration was read."""

    id: str | None = None
    name: str | None = None
    link: str | None = None
    source: str | None = None  # "README.md front matter", "GGUF general.license"

    @property
    def declared(self) -> bool:
        return self.id is not None or self.name is not None

    def __str__(self) -> str:
        if not self.declared:
            return "not declared"
        # `license: other` (or unknown) defers to license_name: that is the licence's id.
        main = self.name if self.name and self.id in (None, "other", "unknown") else self.id
        text = f"{main} ({LICENCE_TITLES[main]})" if main in LICENCE_TITLES else f"{main}"
        if self.name and main != self.name:
            text += f", license_name {self.name}"
        if self.link:
            text += f", {self.link}"
        return f"{text} [{self.source}]"

    def gguf_metadata(self) -> dict[str, str]:
        """The general.license* keys to write into a GGUF file (only the declared ones)."""
        values = {"license": self.id, "license_name": self.name, "license_link": self.link}
        return {k: values[v] for k, v in GGUF_LICENCE_KEYS.items() if values[v] is not None}


@dataclass(frozen=True)
class ModelCard:
    """A checkpoint's family (from its architecture and config) and declared licence."""

    family: str  # "Falcon 7B-style multi-query", "Falcon3 (Llama architecture)", ...
    architecture: str  # the registry's name: falcon, llama
    family_source: str  # "config.json", "GGUF general.architecture"
    licence: Licence = field(default_factory=Licence)

    def summary(self) -> str:
        """One line for logs: family and licence."""
        return f"family {self.family}; licence {self.licence}"


# ---- family -----------------------------------------------------------------------------


def family_name(config: ModelConfig) -> str:
    """The generation a config describes, in the names users know, from its fields only."""
    arch = for_config(config).name
    if arch == "llama":
        # Falcon3 (and Falcon-Arabic, the 1.58-bit Falcon3) are LlamaForCausalLM checkpoints.
        return "Falcon3 (Llama architecture)"
    if arch == "falcon_mamba":
        return "Falcon-Mamba (Mamba-1, state-space)"
    if arch == "falcon_h1":
        return "Falcon-H1 (attention and Mamba-2 in parallel)"
    if not isinstance(config, FalconConfig):
        raise TypeError(f"no family name for {arch} config {type(config).__name__}")
    if config.alibi:
        return "Falcon-RW (rw-1b/rw-7b: ALiBi)"
    if config.block_layout == "parallel_2ln":
        return f"Falcon 40B/180B-style grouped KV ({config.kv_heads} kv heads, two norms)"
    if config.new_decoder_architecture:  # grouped KV, one shared norm
        return f"Falcon2-11B-style grouped KV ({config.kv_heads} kv heads, one norm)"
    if config.multi_query:
        return "Falcon 7B-style multi-query"
    return "Falcon (multi-head attention, rotary)"


# ---- licence ----------------------------------------------------------------------------


def read_front_matter(path: Path) -> dict[str, str]:
    """The top-level `key: scalar` pairs of a Markdown file's YAML front matter, read from
    its first FRONT_MATTER_MAX_BYTES. {} when the file is absent or unreadable, has no
    front matter, or has front matter this reader does not accept (unterminated within
    the limit, not UTF-8, a line that is neither `key: value`, nested content, a comment
    nor blank, or a repeated key). Values of nested blocks, lists, flow collections and
    block scalars are left out: only plain and simply quoted scalars are returned."""
    try:
        with path.open("rb") as f:
            head = f.read(FRONT_MATTER_MAX_BYTES)
    except OSError:
        return {}
    whole = len(head) < FRONT_MATTER_MAX_BYTES  # else the last line may be cut off
    lines = head.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines[0].rstrip(b"\r") != b"---":
        return {}
    body = []
    for raw in lines[1:] if whole else lines[1:-1]:
        line = raw.rstrip(b"\r")
        if line in (b"---", b"..."):
            break
        body.append(line)
    else:
        return {}  # unterminated (or longer than the limit)
    try:
        text = [line.decode("utf-8") for line in body]
    except UnicodeDecodeError:
        return {}
    out: dict[str, str] = {}
    seen: set[str] = set()
    for line in text:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" or line == "-" or line.startswith("- "):
            continue  # inside a nested block or a list: not a top-level scalar
        key, sep, rest = line.partition(":")
        if not sep or not _KEY_RE.fullmatch(key) or (rest and rest[0] not in " \t"):
            return {}
        if key in seen:
            return {}
        seen.add(key)
        value = _scalar(rest.strip())
        if value is not None:
            out[key] = value
    return out


def _scalar(text: str) -> str | None:
    """A plain or quoted YAML scalar's value; None for anything else (empty, a flow
    collection, a block scalar, an anchor, alias or tag, an escape)."""
    if not text or text[0] in "[{|>&*!%@`":
        return None
    if text[0] in "\"'":
        quote, end = text[0], text.find(text[0], 1)
        after = text[end + 1 :].strip() if end > 0 else "#"
        if end < 0 or (after and not after.startswith("#")):
            return None  # unterminated, or text after the closing quote ('' escapes too)
        value = text[1:end]
        return None if quote == '"' and "\\" in value else value
    value = text.split(" #", 1)[0].rstrip()
    return None if value in ("~", "null", "Null", "NULL") else value


def _clean(value: str | None, pattern: re.Pattern[str]) -> str | None:
    return value if value is not None and pattern.fullmatch(value) else None


def licence_from_values(values: Mapping[str, str], source: str) -> Licence:
    """A Licence from front-matter style values (license, license_name, license_link);
    values that are no plausible id or http(s) link count as undeclared."""
    licence = Licence(
        id=_clean(values.get("license"), _ID_RE),
        name=_clean(values.get("license_name"), _ID_RE),
        link=_clean(values.get("license_link"), _LINK_RE),
        source=source,
    )
    return licence if licence.declared else Licence()


def read_licence(folder: Path) -> Licence:
    """The licence a HF model folder's README.md front matter declares."""
    values = read_front_matter(Path(folder) / CARD_FILE)
    return licence_from_values(values, f"{CARD_FILE} front matter")


def gguf_licence(metadata: Mapping[str, str]) -> Licence:
    """The licence a GGUF file's general.license* string keys declare."""
    values = {v: metadata[k] for k, v in GGUF_LICENCE_KEYS.items() if k in metadata}
    return licence_from_values(values, "GGUF general.license")


# ---- cards ------------------------------------------------------------------------------


def card_for_config(config: ModelConfig, source: str, licence: Licence | None = None) -> ModelCard:
    return ModelCard(family_name(config), for_config(config).name, source, licence or Licence())


def read_card(folder: Path, config: ModelConfig) -> ModelCard:
    """The card of a HF model folder whose config.json gave `config`."""
    return card_for_config(config, "config.json", read_licence(folder))


def gguf_card(config: ModelConfig, metadata: Mapping[str, str]) -> ModelCard:
    """The card of a GGUF file: `config` from its metadata, `metadata` its string keys."""
    return card_for_config(config, "GGUF general.architecture", gguf_licence(metadata))
