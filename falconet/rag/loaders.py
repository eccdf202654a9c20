"""What RAG reads, and the content hashes its store keys documents by.

Reading itself (decoding, HTML visible text, PDF pages, the size limit, the folder walk)
is `falconet.documents`, shared with `train`, so a file gives the same text to both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from falconet import documents
from falconet.documents import DEFAULT_MAX_BYTES, Document
from falconet.errors import LoaderError

# The kinds of file RAG indexes (and the server accepts as uploads).
SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


def load_document(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    """Read one file RAG indexes into a Document, or raise LoaderError naming it."""
    return documents.load_document(path, max_bytes, suffixes=SUPPORTED_SUFFIXES)


def find_documents(folder: Path) -> list[Path]:
    """The files under `folder` RAG indexes, sorted and resolved (a symlink inside the
    folder may point out of it); what the walk skips is `documents.find_documents`'s."""
    return [f.resolve() for f in documents.find_documents(folder.resolve(), SUPPORTED_SUFFIXES)]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (no whole-file copy in memory)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as e:
        raise LoaderError(f"{path} cannot be read: {e.strerror or e}") from None
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
