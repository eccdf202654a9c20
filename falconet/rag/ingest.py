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

Every document is bounded before it costs much (`IngestLimits`): only a regular file is
opened, its size is checked before a byte is read, and chunking stops as soon as the
document is over its chunk or token budget. A refused document is skipped with its reason
(`IngestReport.skipped`) and nothing of it is written. Vectors are computed a few chunks
at a time (`EMBED_BATCH`), so a shared embedder serves queries between batches, and a
`cancel` event set by the caller stops the work at the next batch.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from falconet.documents import DEFAULT_MAX_BYTES, regular_file_stat
from falconet.errors import IngestCancelled, LimitError, LoaderError, RagError
from falconet.rag.chunking import chunk_document
from falconet.rag.embed import Embedder
from falconet.rag.loaders import file_sha256, find_documents, load_document, resolve_path
from falconet.rag.store import DocMeta, DocumentStore, document_id

# progress(files done, files in all, the file just done or None when starting)
Progress = Callable[[int, int, "str | None"], None]


@dataclass(frozen=True)
class ChunkSettings:
    """How documents are cut into chunks (tokens as the embedder counts them)."""

    max_tokens: int = 200
    overlap_tokens: int = 40


# Chunks embedded per call. A query waiting for a shared embedder (the server's) waits for
# at most one such call: 4 chunks of ~200 tokens take ~0.45 s on one busy CPU core, and
# larger calls are hardly cheaper per chunk there (benchmarks/bench_rag_limits.py).
EMBED_BATCH = 4
# Every document may cost this many tokens whatever its density (see IngestLimits).
MIN_TOKEN_BUDGET = 65_536
# The largest file `falconet serve` accepts as an upload (--rag-max-upload-mb): a long
# book's text or a PDF with pictures fits; larger files can be ingested by path.
DEFAULT_MAX_UPLOAD_MB = 16


@dataclass(frozen=True)
class IngestLimits:
    """Per-document bounds, checked before the work they bound. The defaults are far above
    what real documents need; the `falconet rag` flags are --max-file-mb, --max-chunks and
    --max-tokens-per-byte, `falconet serve`'s the same with --rag- in front.

    - max_file_mb: the file's size, checked before it is opened.
    - max_chunks: the chunks one document may make (20,000 chunks: ~11 MB of English
      prose, about half an hour of embedding on two CPU cores).
    - max_tokens_per_byte: embedding costs per token, and text in any language runs at
      0.2-0.4 embedder tokens per UTF-8 byte (English prose ~0.25, Python source and
      Markdown ~0.32, Chinese ~0.33; a table of numbers ~0.5); a wall of dashes or digits
      runs at 1, costs four times as much as prose and retrieves nothing. A document may
      have MIN_TOKEN_BUDGET tokens, or this many per byte of its text if that is more.
    """

    max_file_mb: int = DEFAULT_MAX_BYTES // 2**20
    max_chunks: int = 20_000
    max_tokens_per_byte: float = 0.6
    flag_prefix: str = ""  # how the face's flags spell the limits: "rag-" for the server

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 2**20

    def checked(self) -> IngestLimits:
        """These limits, or a RagError naming the flag whose value is out of range."""

        def flag(name: str) -> str:
            return "--" + self.flag_prefix + name.replace("_", "-")

        for name in ("max_file_mb", "max_chunks"):
            if getattr(self, name) < 1:
                raise RagError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if not self.max_tokens_per_byte > 0:  # also NaN
            raise RagError(f"{flag('max_tokens_per_byte')} must be more than 0, got "
                           f"{self.max_tokens_per_byte}")  # fmt: skip
        return self

    def budget(self, source: str, text: str, chunk_tokens: int) -> Callable[[int, int], None]:
        """The check `chunk_document` calls with (chunks made, tokens counted) as it goes:
        it raises a LimitError once `text` is over its chunk or token budget."""
        text_bytes = len(text.encode("utf-8", "surrogatepass"))
        max_tokens = max(MIN_TOKEN_BUDGET, int(self.max_tokens_per_byte * text_bytes))
        # More tokens than max_chunks full chunks hold cannot fit in max_chunks chunks.
        chunks_worth = self.max_chunks * chunk_tokens

        def check(chunks: int, tokens: int) -> None:
            if chunks > self.max_chunks or tokens > chunks_worth:
                raise LimitError(
                    f"{source} makes over {self.max_chunks:,} chunks, the limit for one document",
                    "max_chunks",
                )
            if tokens > max_tokens:
                raise LimitError(
                    f"{source} has over {max_tokens:,} tokens in {text_bytes:,} bytes of text, "
                    f"over {self.max_tokens_per_byte:g} a byte (text runs at 0.2-0.4; this "
                    "looks like punctuation, digits or other noise)",
                    "max_tokens_per_byte",
                )

        return check


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

    def skip(self, path: str | os.PathLike, why: str) -> None:
        self.skipped.append((printable(path), why))

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
    limits: IngestLimits = IngestLimits(),
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> IngestReport:
    """Add or update the given files and the supported files under the given folders.

    Raises IngestCancelled when `cancel` is set: the documents done by then are stored,
    the one in progress is not."""
    t0 = time.perf_counter()
    report = IngestReport()
    files = []
    for p in paths:
        path, is_dir = checked_path(p)
        files.extend(find_documents(path, report.skip) if is_dir else [resolve_path(path)])
    ingest_files(store, list(dict.fromkeys(files)), embedder, chunking=chunking, limits=limits,
                 progress=progress, cancel=cancel, report=report)  # fmt: skip
    report.seconds_total = time.perf_counter() - t0
    return report


def ingest_files(
    store: DocumentStore,
    files: list[Path],
    embedder: Embedder,
    *,
    chunking: ChunkSettings = ChunkSettings(),
    limits: IngestLimits = IngestLimits(),
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    report: IngestReport | None = None,
) -> IngestReport:
    """Add or update these files (found by a walk, resolved): each that cannot be
    ingested is skipped with its reason, as `ingest` does for the files it finds."""
    t0 = time.perf_counter()
    report = IngestReport() if report is None else report
    _finish_embedder_switch(store, embedder, report, cancel)
    _Work(store, embedder, chunking, limits, cancel).files(files, progress, report)
    report.seconds_total = time.perf_counter() - t0
    return report


def sync(
    store: DocumentStore,
    folder: str | os.PathLike,
    embedder: Embedder,
    *,
    chunking: ChunkSettings = ChunkSettings(),
    limits: IngestLimits = IngestLimits(),
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> IngestReport:
    """Make the store's documents under `folder` match its files: add new ones, re-ingest
    changed ones, remove the documents whose files are gone."""
    t0 = time.perf_counter()
    root, is_dir = checked_path(folder)
    if not is_dir:
        raise RagError(f"{folder}: not a folder (sync takes a folder; use ingest for files)")
    root = root.resolve()
    report = IngestReport()
    unlisted: list[Path] = []  # what is in there is unknown, not gone

    def unlistable(path: Path, why: str) -> None:
        report.skip(path, why)
        unlisted.append(path)

    files = find_documents(root, unlistable)
    present = {str(f) for f in files}
    if progress:
        progress(0, len(files), None)
    for doc in store.documents():
        gone = doc.source not in present and not any(_is_under(doc.source, u) for u in unlisted)
        if _is_under(doc.source, root) and gone:
            store.remove_document(doc.id)
            report.removed.append(doc.source)
    _finish_embedder_switch(store, embedder, report, cancel)
    _Work(store, embedder, chunking, limits, cancel).files(files, progress, report)
    report.seconds_total = time.perf_counter() - t0
    return report


def ingest_file(
    store: DocumentStore,
    path: str | os.PathLike,
    embedder: Embedder,
    *,
    chunking: ChunkSettings = ChunkSettings(),
    limits: IngestLimits = IngestLimits(),
    cancel: threading.Event | None = None,
) -> IngestReport:
    """Ingest one file, raising what `ingest` would report as skipped: a LoaderError
    (LimitError for a limit), or IngestCancelled. Nothing of a refused file is stored."""
    t0 = time.perf_counter()
    report = IngestReport()
    _finish_embedder_switch(store, embedder, report, cancel)
    _Work(store, embedder, chunking, limits, cancel).one(resolve_path(Path(path)), report)
    report.seconds_total = time.perf_counter() - t0
    return report


def printable(path: str | os.PathLike) -> str:
    """A path as text that encodes to UTF-8: Linux names may hold any bytes, and the odd
    ones show as \\xNN escapes."""
    text = str(os.fspath(path))
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Work:
    store: DocumentStore
    embedder: Embedder
    chunking: ChunkSettings
    limits: IngestLimits
    cancel: threading.Event | None

    def files(self, files: list[Path], progress: Progress | None, report: IngestReport) -> None:
        if progress:
            progress(0, len(files), None)
        for i, path in enumerate(files):
            try:
                self.one(path, report)
            except OSError as e:  # vanished or unreadable between the walk and the read
                report.skip(path, e.strerror or str(e))
            except LimitError as e:  # named with the flag that raises the limit
                report.skip(path, e.message(self.limits.flag_prefix))
            except IngestCancelled:
                raise
            except (LoaderError, RagError) as e:  # binary, empty, not a regular file, ...
                report.skip(path, str(e))
            if progress:
                progress(i + 1, len(files), str(path))

    def one(self, path: Path, report: IngestReport) -> None:
        _check_cancel(self.cancel)
        store, limits = self.store, self.limits
        source = str(path)
        if printable(source) != source:  # the store keys documents by their UTF-8 path
            raise LoaderError(f"{printable(source)}: the name is not valid UTF-8; rename the file")
        old = store.document(document_id(source))
        try:
            # Before anything is opened: a FIFO would block, a 4 GB file take minutes.
            st = regular_file_stat(path, limits.max_file_bytes)
            # Cheap first: a file with the recorded size and mtime is not read at all.
            if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                report.unchanged.append(source)
                return
            sha = file_sha256(path, limits.max_file_bytes)
            if old is not None and old.sha256 == sha:  # touched, not changed: write nothing
                report.unchanged.append(source)
                return
            doc = load_document(path, max_bytes=limits.max_file_bytes)
            max_tokens = self.chunking.max_tokens
            chunks = chunk_document(
                doc, self.embedder.count_tokens, max_tokens=max_tokens,
                overlap_tokens=self.chunking.overlap_tokens,
                budget=limits.budget(source, doc.text, max_tokens),
            )  # fmt: skip
        except LoaderError:
            # The file changed into something that cannot be indexed (gone, emptied,
            # binary, too big): its old text must not keep answering queries.
            if old is not None:
                store.remove_document(old.id)
                report.removed.append(source)
            raise
        if not chunks:  # the loader refuses empty documents; kept for other loaders
            report.skipped.append((source, "no text to index"))
            return
        t = time.perf_counter()
        vectors = _embed(self.embedder, [c.text for c in chunks], self.cancel)
        report.seconds_embedding += time.perf_counter() - t
        meta = DocMeta(source=source, sha256=sha, size=st.st_size, mtime_ns=st.st_mtime_ns,
                       embedder=self.embedder.id)  # fmt: skip
        store.upsert_document(meta, chunks, vectors)
        (report.added if old is None else report.updated).append(source)
        report.chunks_written += len(chunks)


def _embed(embedder: Embedder, texts: list[str], cancel: threading.Event | None) -> np.ndarray:
    """`embedder.embed(texts)`, EMBED_BATCH texts a call, checking `cancel` before each."""
    parts = []
    for i in range(0, len(texts), EMBED_BATCH):
        _check_cancel(cancel)
        parts.append(embedder.embed(texts[i : i + EMBED_BATCH]))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise IngestCancelled("ingestion cancelled; the document in progress was not stored")


def _finish_embedder_switch(
    store: DocumentStore, embedder: Embedder, report: IngestReport, cancel: threading.Event | None
) -> None:
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
        vectors = _embed(embedder, texts, cancel)
        report.seconds_embedding += time.perf_counter() - t
        store.replace_embeddings(doc.id, embedder.id, ids, vectors)
        report.reembedded.append(doc.source)
    store.set_embedder(embedder.id, embedder.dim)


def checked_path(given: str | os.PathLike) -> tuple[Path, bool]:
    """A path named by the user (~ expanded), and whether it is a folder; RagError if it
    names nothing that can be read (missing, a symlink loop)."""
    path = Path(given).expanduser()
    try:
        return path, stat.S_ISDIR(path.stat().st_mode)
    except (OSError, ValueError) as e:
        if getattr(e, "errno", None) == errno.ELOOP:
            raise RagError(f"{given}: a symlink loop (its links never reach a file)") from None
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            raise RagError(f"{given}: no such file or folder") from None
        raise RagError(f"{given}: cannot be read ({getattr(e, 'strerror', None) or e})") from None


def _is_under(source: str, root: Path) -> bool:
    try:
        Path(source).relative_to(root)
    except ValueError:
        return False
    return True
