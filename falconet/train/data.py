"""Training data: read a corpus, train a byte-level BPE tokenizer, pack token blocks.

A corpus is a folder (or list) of .txt / .md / .html files, or a JSONL file of
{"text": ...} records. Documents are read in sorted path order and joined with the eos
token, so the token stream (and with a seed, the batch order) is the same on every run
and on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from falconet.errors import FalconetError
from falconet.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Falcon's tokenizer: the 11 prompt-format specials, then <|endoftext|> (id 11) as eos.
SPECIAL_TOKENS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
                  ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<",
                  "<|endoftext|>")  # fmt: skip
EOS_TOKEN = "<|endoftext|>"


class DataError(FalconetError):
    """A corpus that cannot be trained on (empty, unreadable, too small)."""


HIDDEN_TAGS = ("script", "style", "noscript", "template")
BLOCK_TAGS = ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section",
              "table", "dd", "dt", "blockquote", "article", "header", "footer", "ul", "ol")  # fmt: skip


class _VisibleText(HTMLParser):
    """The text a browser would show: no <script>, <style> or markup."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "template"):
            self._skip += 1
        elif tag in (
            "p",
            "div",
            "br",
            "li",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "tr",
            "pre",
            "section",
        ):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "template") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, bool]:
    """Visible text, and whether a <script>/<style> was left open (its rest was dropped)."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line), parser._skip > 0


def _read_text_file(path: Path, warn: Callable[[str], None]) -> str | None:
    """The file's text, or None when it is binary (a NUL byte or not UTF-8)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte order mark is not text
    except UnicodeDecodeError:
        return None
    if path.suffix.lower() in HTML_SUFFIXES:
        text, unclosed = html_to_text(text)
        if unclosed:
            warn(f"{path}: an unclosed <script> or <style> hides the rest of the page")
    return text


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{n}: expected an object with a string "text" field')
        try:
            record["text"].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{path}:{n}: the text holds a lone surrogate (\\ud800-\\udfff escape)"
            ) from None
        docs.append(record["text"])
    return docs


@dataclass
class Corpus:
    documents: list[str]
    skipped: list[Path]  # binary or undecodable files, reported to the user

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.documents)


def _corpus_files(folder: Path) -> list[Path]:
    """Text files under `folder`, sorted, skipping hidden entries (.git, .venv, ...)."""
    suffixes = TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def read_corpus(paths: list[Path], warn: Callable[[str], None] = lambda _m: None) -> Corpus:
    """Documents from files and folders (recursively, sorted), or JSONL files."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += _corpus_files(p)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    docs: list[str] = []
    skipped: list[Path] = []
    for f in files:
        try:
            if f.suffix.lower() in JSONL_SUFFIXES:
                docs += [d for d in _read_jsonl(f) if d.strip()]
                continue
            text = _read_text_file(f, warn)
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror})") from None
        if text is None:
            skipped.append(f)
        elif text.strip():
            docs.append(text)
    if not docs:
        where = ", ".join(str(p) for p in paths)
        raise DataError(
            f"no text found in {where}"
            + (f" ({len(skipped)} binary or non-UTF-8 files skipped)" if skipped else "")
            + '; give .txt/.md/.html files or a JSONL of {"text": ...}'
        )
    return Corpus(docs, skipped)


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE like Falcon's: no unknown tokens, specials first, eos = <|endoftext|>."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab size {vocab_size} is too small for a byte-level BPE (need > 268)")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    eos = backend.token_to_id(EOS_TOKEN)
    return Tokenizer(backend, eos_token_ids=(eos,), eos_token=EOS_TOKEN)


def tokenize_corpus(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One int32 stream: each document followed by eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; training needs one to separate documents")
    encoded = tokenizer.backend.encode_batch(documents, add_special_tokens=False)
    pieces = []
    for enc in encoded:
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces)


@dataclass
class Blocks:
    """Token blocks of block_size + 1 (inputs and shifted targets), split train / held-out."""

    train: np.ndarray  # (n_train, block_size + 1) int32
    val: np.ndarray  # (n_val, block_size + 1) int32

    def digest(self) -> str:
        """Identifies the exact data, so a resumed run can check it trains on the same."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.train, self.val):
            h.update(np.ascontiguousarray(a).tobytes())
        return f"{len(self.train)}+{len(self.val)}:{h.hexdigest()}"


def pack_blocks(tokens: np.ndarray, block_size: int, val_fraction: float) -> Blocks:
    """Cut the stream into non-overlapping blocks; every k-th block is held out, so the
    held-out set samples the whole corpus rather than its last document."""
    n = (len(tokens) - 1) // block_size
    if n < 2:
        raise DataError(
            f"the corpus has {len(tokens)} tokens, too few for two blocks of {block_size}; "
            "use a smaller --block-size or more text"
        )
    starts = np.arange(n) * block_size
    blocks = np.stack([tokens[s : s + block_size + 1] for s in starts])
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val >= n:
        raise DataError(f"--val-fraction {val_fraction} leaves no training blocks out of {n}")
    is_val = np.zeros(n, dtype=bool)
    if n_val:
        is_val[np.linspace(0, n - 1, n_val).round().astype(int)] = True
    return Blocks(blocks[~is_val], blocks[is_val])


def batch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of an epoch: a pure function of (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)
