"""What RAG reads, and the content hashes its store keys documents by.

Reading itself (decoding, HTML visible text, PDF pages, the size limit, the folder walk)
is `falconet.documents`, shared with `train`, so a file gives the same text to both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from falconet import documents
from falconet.documents import DEFAULT_MAX_BYTES, Document
from falconet.errors import LoaderError

# The kinds of file RAG indexes (and the server accepts as uploads).
SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


def load_document(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    """Read one file RAG indexes into a Document, or raise LoaderError naming it."""
    return documents.load_document(path, max_bytes, suffixes=SUPPORTED_SUFFIXES)


def find_documents(folder: Path, on_error: Callable[[Path, str], None] | None = None) -> list[Path]:
    """The files under `folder` RAG indexes, sorted and resolved (a symlink inside the
    folder may point out of it); what the walk skips is `documents.find_documents`'s. A
    link that resolves nowhere (a loop) is kept as found, for the reader to refuse by name."""
    found = documents.find_documents(folder.resolve(), SUPPORTED_SUFFIXES, on_error)
    return [resolve_path(f) for f in found]


def resolve_path(path: Path) -> Path:
    """`path` with its symlinks resolved, or as it is when they loop (for the reader to
    refuse by name)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return path


def file_sha256(path: str | Path, max_bytes: int | None = None) -> str:
    """Hex sha256 of a file's bytes, read in blocks (no whole-file copy in memory); only a
    regular file of at most `max_bytes` is opened (see `documents.open_regular_file`)."""
    digest = hashlib.sha256()
    try:
        f = documents.open_regular_file(path, max_bytes)
    except LoaderError:
        if os.path.lexists(path):
            raise
        raise LoaderError(f"{path} cannot be read: no such file") from None
    with f:
        try:
            while block := f.read(1 << 20):
                digest.update(block)
        except OSError as e:
            raise LoaderError(f"{path} cannot be read: {e.strerror or e}") from None
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
