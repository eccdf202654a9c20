"""Exactly-once ingestion: files -> documents, chunks and vectors in the store.

The content sha256 is the idempotency key. A file whose size and mtime match what the
store recorded is not even read; one whose bytes hash to the recorded sha256 is not
loaded, chunked or embedded, and nothing is written for it. Embedding happens outside
any transaction; each document's new version is then committed in one transaction
(`DocumentStore.upsert_document`). A process killed at any moment leaves every document
either at its old version or at its new one, so running the same command again finishes
the job and leaves the store as one clean run would have.

An embedder switch (the store's vectors come from another model) re-embeds every
document first, one transaction per document, and records the new embedder only when
all are done: a switch interrupted by a crash resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from falconet.errors import LoaderError, RagError
from falconet.rag.chunking import chunk_document
from falconet.rag.embed import Embedder
from falconet.rag.loaders import file_sha256, find_documents, load_document
from falconet.rag.store import DocMeta, DocumentStore, document_id

# progress(files done, files in all, the file just done or None when starting)
Progress = Callable[[int, int, "str | None"], None]


@dataclass(frozen=True)
class ChunkSettings:
    """How documents are cut into chunks (tokens as the embedder counts them)."""

    max_tokens: int = 200
    overlap_tokens: int = 40


@dataclass
class IngestReport:
    """What an ingest or sync did, by resolved source path."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    reembedded: list[str] = field(default_factory=list)  # by an embedder switch
    chunks_written: int = 0
    seconds_embedding: float = 0.0
    seconds_total: float = 0.0

    def summary(self) -> str:
        parts = [
            f"{len(self.added)} added",
            f"{len(self.updated)} updated",
            f"{len(self.unchanged)} unchanged",
            f"{len(self.removed)} removed",
            f"{len(self.skipped)} skipped",
        ]
        if self.reembedded:
            parts.append(f"{len(self.reembedded)} re-embedded")
        return (
            ", ".join(parts) + f"; {self.chunks_written} chunks written in "
            f"{self.seconds_total:.1f} s ({self.seconds_embedding:.1f} s embedding)"
        )


def ingest(
    store: DocumentStore,
    paths: Iterable[str | os.PathLike],
    embedder: Embedder,
    *,
    chunking: ChunkSettings = ChunkSettings(),
    max_bytes: int | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Add or update the given files and the supported files under the given folders."""
    t0 = time.perf_counter()
    report = IngestReport()
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise RagError(f"{p}: no such file or folder")
        files.extend(find_documents(path) if path.is_dir() else [path.resolve()])
    _finish_embedder_switch(store, embedder, report)
    _ingest_files(
        store, list(dict.fromkeys(files)), embedder, chunking, max_bytes, progress, report
    )
    report.seconds_total = time.perf_counter() - t0
    return report


def sync(
    store: DocumentStore,
    folder: str | os.PathLike,
    embedder: Embedder,
    *,
    chunking: ChunkSettings = ChunkSettings(),
    max_bytes: int | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Make the store's documents under `folder` match its files: add new ones, re-ingest
    changed ones, remove the documents whose files are gone."""
    t0 = time.perf_counter()
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RagError(f"{folder}: not a folder (sync takes a folder; use ingest for files)")
    root = root.resolve()
    report = IngestReport()
    files = find_documents(root)
    present = {str(f) for f in files}
    if progress:
        progress(0, len(files), None)
    for doc in store.documents():
        if _is_under(doc.source, root) and doc.source not in present:
            store.remove_document(doc.id)
            report.removed.append(doc.source)
    _finish_embedder_switch(store, embedder, report)
    _ingest_files(store, files, embedder, chunking, max_bytes, progress, report)
    report.seconds_total = time.perf_counter() - t0
    return report


def _ingest_files(
    store: DocumentStore,
    files: list[Path],
    embedder: Embedder,
    chunking: ChunkSettings,
    max_bytes: int | None,
    progress: Progress | None,
    report: IngestReport,
) -> None:
    if progress:
        progress(0, len(files), None)
    for i, path in enumerate(files):
        try:
            _ingest_one(store, path, embedder, chunking, max_bytes, report)
        except OSError as e:  # vanished or unreadable between the walk and the read
            report.skipped.append((str(path), e.strerror or str(e)))
        except (LoaderError, RagError) as e:  # binary, too big, broken PDF, empty, ...
            report.skipped.append((str(path), str(e)))
        if progress:
            progress(i + 1, len(files), str(path))


def _ingest_one(
    store: DocumentStore,
    path: Path,
    embedder: Embedder,
    chunking: ChunkSettings,
    max_bytes: int | None,
    report: IngestReport,
) -> None:
    source = str(path)
    st = path.stat()
    old = store.document(document_id(source))
    # Cheap first: a file with the recorded size and mtime is not read at all.
    if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
        report.unchanged.append(source)
        return
    sha = file_sha256(path)
    if old is not None and old.sha256 == sha:  # touched, not changed: write nothing
        report.unchanged.append(source)
        return
    try:
        doc = load_document(path) if max_bytes is None else load_document(path, max_bytes=max_bytes)
    except LoaderError:
        # The file changed into something that cannot be indexed (emptied, binary, too
        # big): its old text must not keep answering queries.
        if old is not None:
            store.remove_document(old.id)
            report.removed.append(source)
        raise
    chunks = chunk_document(
        doc, embedder.count_tokens, max_tokens=chunking.max_tokens,
        overlap_tokens=chunking.overlap_tokens,
    )  # fmt: skip
    if not chunks:  # the loader refuses empty documents; kept for other loaders
        report.skipped.append((source, "no text to index"))
        return
    t = time.perf_counter()
    vectors = embedder.embed([c.text for c in chunks])
    report.seconds_embedding += time.perf_counter() - t
    meta = DocMeta(source=source, sha256=sha, size=st.st_size, mtime_ns=st.st_mtime_ns,
                   embedder=embedder.id)  # fmt: skip
    store.upsert_document(meta, chunks, vectors)
    (report.added if old is None else report.updated).append(source)
    report.chunks_written += len(chunks)


def _finish_embedder_switch(store: DocumentStore, embedder: Embedder, report: IngestReport) -> None:
    """Re-embed every document whose vectors come from another embedder (one transaction
    each), then record `embedder` as the store's. Safe to interrupt and run again."""
    if store.embedder_id is None or (store.embedder_id, store.dim) == (embedder.id, embedder.dim):
        return
    for doc in store.documents():
        if doc.embedder == embedder.id:
            continue  # done before an interruption
        rows = store.chunk_texts(doc.id)
        ids, texts = [cid for cid, _ in rows], [text for _, text in rows]
        t = time.perf_counter()
        vectors = embedder.embed(texts)
        report.seconds_embedding += time.perf_counter() - t
        store.replace_embeddings(doc.id, embedder.id, ids, vectors)
        report.reembedded.append(doc.source)
    store.set_embedder(embedder.id, embedder.dim)


# The name server/rag_routes.py imports; loaders.find_documents is the one to use.
_walk = find_documents


def _is_under(source: str, root: Path) -> bool:
    try:
        Path(source).relative_to(root)
    except ValueError:
        return False
    return True
