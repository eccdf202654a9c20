"""Training data: read a corpus, train a byte-level BPE tokenizer, pack token blocks.

A corpus is a folder (or list) of .txt / .md / .rst / .html files, or a JSONL file of
{"text": ...} records. Files are read by the shared reader (`falconet.documents`, as
`rag` reads them: the same decoding, the same visible text of an HTML page); a file it
refuses (binary, unreadable, empty) is skipped and reported. Documents are read in sorted
path order and joined with the eos token, so the token stream (and with a seed, the batch
order) is the same on every run and on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from falconet.documents import (
    DOCUMENT_SUFFIXES,
    HTML_SUFFIXES,
    MARKDOWN_SUFFIXES,
    PLAIN_TEXT_SUFFIXES,
    find_documents,
    load_document,
    read_text,
)
from falconet.errors import FalconetError, LoaderError
from falconet.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# What a folder's walk takes. A file named on its own is read whatever its type: a PDF as
# a PDF, an unknown type as plain text.
CORPUS_SUFFIXES = PLAIN_TEXT_SUFFIXES + MARKDOWN_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES

# Falcon's tokenizer: the 11 prompt-format specials, then <|endoftext|> (id 11) as eos.
SPECIAL_TOKENS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
                  ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<",
                  "<|endoftext|>")  # fmt: skip
EOS_TOKEN = "<|endoftext|>"


class DataError(FalconetError):
    """A corpus that cannot be trained on (empty, unreadable, too small)."""


def _read_jsonl(path: Path) -> list[str]:
    # No size limit: a corpus file is read whole into memory in any case.
    lines = read_text(path, max_bytes=None).split("\n")  # not splitlines(): U+2028 is text
    docs = []
    for n, line in enumerate(lines, 1):
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


def _read_file(path: Path, warn: Callable[[str], None]) -> list[str]:
    """The documents in one corpus file; LoaderError if the reader refuses it."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return [d for d in _read_jsonl(path) if d.strip()]
    if suffix not in DOCUMENT_SUFFIXES:  # named on its own: plain text
        return [read_text(path, max_bytes=None)]
    doc = load_document(path, max_bytes=None)
    for message in doc.warnings:
        warn(message)
    return [doc.text]


@dataclass
class Corpus:
    documents: list[str]
    skipped: list[tuple[Path, str]]  # (file, why: the reader's message, naming the file)

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.documents)


def read_corpus(paths: list[Path], warn: Callable[[str], None] = lambda _m: None) -> Corpus:
    """Documents from files and folders (recursively, sorted), or JSONL files."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += find_documents(p, CORPUS_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    docs: list[str] = []
    skipped: list[tuple[Path, str]] = []
    for f in files:
        try:
            docs += _read_file(f, warn)
        except LoaderError as e:
            skipped.append((f, str(e)))
    if not docs:
        where = ", ".join(str(p) for p in paths)
        why = f"; {len(skipped)} skipped ({skipped[0][1]}{', ...' if len(skipped) > 1 else ''})"
        raise DataError(
            f"no text found in {where}"
            + (why if skipped else "")
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
