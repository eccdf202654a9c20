"""The RAG store's interface: what ingestion and retrieval need, and what every backend shares.

`DocumentStore` is the protocol the ingest and retrieval code use. Two backends implement
it: `SQLiteStore` (falconet/rag/store_sqlite.py), one file in a folder, the embedded
default; and `PostgresStore` (falconet/rag/store_postgres.py), PostgreSQL with pgvector, a
store several processes or machines share. `stores.open_store` picks one from what the user gave.

Both key a document by the sha256 of its resolved source path and a chunk by the document,
the content sha256 and the chunk's place (`document_id`, `chunk_id`), so the same bytes
ingested twice, by one process or two, give the same rows; and both choose the words a
BM25 query searches for by the same rule (`choose_bm25_terms`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from falconet.errors import RagError


@dataclass(frozen=True)
class DocMeta:
    """What the store records about a document's file (the content hash is the key)."""

    source: str  # resolved absolute path
    sha256: str  # of the file's bytes: the idempotency key
    size: int
    mtime_ns: int
    embedder: str  # id of the embedder that computed its vectors


@dataclass(frozen=True)
class StoredDocument:
    id: str
    source: str
    sha256: str
    version: int
    size: int
    mtime_ns: int
    embedder: str
    ingested_at: float
    chunks: int


@dataclass(frozen=True)
class Hit:
    """A chunk found by a search; `score` is larger for better matches."""

    chunk_id: str
    doc_id: str
    source: str
    ord: int
    text: str
    start: int
    end: int
    section: str | None
    page: int | None
    score: float


class ChunkLike(Protocol):
    text: str
    start: int
    end: int
    section: str | None
    page: int | None


def document_id(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def chunk_id(doc_id: str, content_sha256: str, ord: int, start: int, end: int) -> str:
    # The document id is part of the key so two files with the same bytes (a copy) keep
    # separate chunks; the content hash and offsets make re-ingesting the same bytes
    # produce the same ids.
    return hashlib.sha256(f"{doc_id}:{content_sha256}:{ord}:{start}:{end}".encode()).hexdigest()


@runtime_checkable
class DocumentStore(Protocol):
    """What ingestion and retrieval need from a store (SQLite or PostgreSQL)."""

    @property
    def embedder_id(self) -> str | None: ...
    @property
    def dim(self) -> int | None: ...
    def documents(self) -> list[StoredDocument]: ...
    def document(self, id_or_source: str) -> StoredDocument | None: ...
    def upsert_document(
        self, meta: DocMeta, chunks: Sequence[ChunkLike], vectors: np.ndarray
    ) -> StoredDocument: ...
    def remove_document(self, id_or_source: str) -> StoredDocument: ...
    def chunk_texts(self, doc_id: str) -> list[tuple[str, str]]: ...
    def replace_embeddings(
        self, doc_id: str, embedder: str, chunk_ids: Sequence[str], vectors: np.ndarray
    ) -> None: ...
    def set_embedder(self, embedder: str, dim: int) -> None: ...
    def search_bm25(self, query: str, k: int) -> list[Hit]: ...
    def search_vector(self, vector: np.ndarray, k: int, ann: bool = False) -> list[Hit]: ...
    def checksum(self, versions: bool = True) -> str: ...
    def integrity_check(self) -> list[str]: ...
    def close(self) -> None: ...


_TERM = re.compile(r"\w+", re.UNICODE)

# BM25 query terms (see `choose_bm25_terms`). A BM25 index scores every chunk that
# matches any term of an OR query (~2 us a chunk in FTS5), so a word found in most chunks
# ("the", "what") costs a pass over the whole index while adding little to the ranking. A
# term in more than half of the chunks is dropped: BM25 gives it an IDF of 1e-6, so it
# cannot change the order. The others are taken rarest first while the chunks they match
# add up to at most BM25_MAX_POSTINGS, which bounds a query's cost whatever the store's
# size; a store under that size is searched for all of them. The rarest term is always
# taken (a query of common words only still finds chunks), and at most BM25_MAX_TERMS.
BM25_MAX_POSTINGS = 30_000
BM25_MAX_TERMS = 16


def query_terms(text: str) -> list[str]:
    """The user's words, lowercased, each once, in order."""
    return list(dict.fromkeys(t.lower() for t in _TERM.findall(text)))


def choose_bm25_terms(terms: Sequence[str], n: int, df: dict[str, int]) -> list[str]:
    """The `terms` a BM25 query searches for, rarest first, given the store's chunk count
    `n` and each term's document frequency `df` (see BM25_MAX_POSTINGS)."""
    # Rarest first; ties keep the query's order. A term the vocabulary lacks (df 0) goes
    # last: absent, or spelled otherwise by the tokenizer ("a_b" is the phrase "a b"), it
    # costs ~nothing and must not push out a word the index has.
    ranked = sorted(terms, key=lambda t: (df[t] == 0, df[t]))
    chosen: list[str] = []
    postings = 0
    for t in ranked[:BM25_MAX_TERMS]:
        if chosen and (2 * df[t] > n or postings + df[t] > BM25_MAX_POSTINGS):
            break
        chosen.append(t)
        postings += df[t]
    return chosen


def checked_vectors(vectors: np.ndarray, rows: int, where: str) -> np.ndarray:
    """`vectors` as an array of one row per chunk, or a RagError saying what came instead
    (each row is checked again by `checked_vector`; this message is the clearer one)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise RagError(f"{where}: {rows} chunks but vectors of shape {tuple(vectors.shape)}")
    return vectors


def checked_vector(vector: np.ndarray, dim: int | None, where: str) -> np.ndarray:
    """`vector` as float32, or a RagError if it has the wrong size or a NaN/inf value."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if dim is not None and v.shape[0] != dim:
        raise RagError(f"{where}: a vector of {v.shape[0]} dimensions; the store expects {dim}")
    if not np.all(np.isfinite(v)):
        raise RagError(f"{where}: a vector with NaN or infinite values")
    return v


# A collection's name is a PostgreSQL schema's or a folder's: plain lowercase, so it never
# needs quoting to mean what it says, and never one of PostgreSQL's own (pg_*).
_COLLECTION_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_collection_name(name: str) -> str:
    """`name` if it can name a store collection (a PostgreSQL schema), else a RagError."""
    if not isinstance(name, str) or not _COLLECTION_NAME.fullmatch(name) or name.startswith("pg_"):
        raise RagError(
            f"{name!r} cannot name a store collection (a PostgreSQL schema): use 1-63 "
            "lowercase letters, digits and underscores, not starting with a digit or pg_"
        )
    return name
