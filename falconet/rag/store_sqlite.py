"""The SQLite `DocumentStore`: documents, chunks, embeddings and a BM25 index in one file.

Everything a document owns (its row, its chunks, their vectors and their FTS5 rows) is
written in one transaction, so a process killed at any moment leaves either the old
version of a document or the whole new one. The file runs in WAL mode with
`synchronous=FULL`: a committed document survives a crash or a power cut.

Layout (one file, `store.sqlite3`):

    meta        key -> value: schema version, embedder id and dim, a write counter
    documents   id = sha256(resolved source path), source, sha256 of the content, version, ...
    chunks      id = sha256(doc id, content sha256, ord, start, end); text, offsets, section, page
    embeddings  chunk id -> float32 vector (bytes)
    chunks_fts  FTS5 over chunks.text (external content, kept in sync by triggers)
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from falconet.errors import RagError
from falconet.rag.ann import AnnIndex
from falconet.rag.store import (
    ChunkLike,
    DocMeta,
    Hit,
    StoredDocument,
    checked_vector,
    checked_vectors,
    choose_bm25_terms,
    chunk_id,
    document_id,
    query_terms,
)

SCHEMA_NAME = "falconet-rag"
SCHEMA_VERSION = 1
STORE_FILE = "store.sqlite3"
BUSY_TIMEOUT_MS = 30_000  # another process ingesting into the same store waits, not fails

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    embedder TEXT NOT NULL,
    ingested_at REAL NOT NULL
);
CREATE TABLE chunks (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(id),
    ord INTEGER NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    section TEXT,
    page INTEGER,
    UNIQUE (doc_id, ord)
);
CREATE TABLE embeddings (
    chunk_id TEXT PRIMARY KEY REFERENCES chunks(id),
    vector BLOB NOT NULL
);
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text, content='chunks', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER chunks_fts_update AFTER UPDATE OF text ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
END;
"""


def fts_query(text: str, terms: Sequence[str] | None = None) -> str | None:
    """The user's words (or `terms`) as an FTS5 query of quoted terms joined by OR (None:
    no words).

    Quoting every term makes FTS5 operators in the input (`"`, `NEAR(`, `*`, `-`,
    `AND`, `col:`) plain words, so no query string can raise a syntax error.
    """
    if terms is None:
        terms = query_terms(text)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _vocab_key(term: str) -> str:
    """`term` as FTS5's unicode61 tokenizer (remove_diacritics 2) stores it, near enough
    (see `SQLiteStore.bm25_terms` for a term it misses)."""
    folded = unicodedata.normalize("NFKD", term)
    return "".join(c for c in folded if not unicodedata.combining(c))


class _Unchanged(Exception):
    """Rolls back an upsert of the bytes the store already holds."""


class SQLiteStore:
    """A `DocumentStore` in one SQLite file. Not shared between threads."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise RagError(f"no RAG store at {self.path}; ingest documents first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
        except sqlite3.Error as e:
            raise RagError(f"cannot open the RAG store {self.path}: {e}") from e
        self._lock = threading.Lock()
        self._matrix: tuple[str, str | None, np.ndarray, np.ndarray] | None = None
        # (generation, chunk count, term -> chunks containing it): see `bm25_terms`
        self._df: tuple[str | None, int, dict[str, int]] | None = None
        self._ann: AnnIndex | None = None  # built on the first search with ann=True
        try:
            self._setup()
        except sqlite3.OperationalError as e:
            self._db.close()
            raise RagError(f"cannot open the RAG store {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise RagError(
                f"{self.path} is not a readable RAG store ({e}); move it aside and ingest again"
            ) from e
        except BaseException:
            self._db.close()
            raise

    # -- opening ---------------------------------------------------------------------

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise RagError(f"{self.path}: SQLite could not switch to WAL mode")
            db.execute("PRAGMA synchronous = FULL")
            meta_rows = ",".join(
                f"('{k}', '{v}')"
                for k, v in (("schema", SCHEMA_NAME), ("schema_version", SCHEMA_VERSION),
                             ("generation", 0))
            )  # fmt: skip
            try:
                # One script, one transaction: the schema appears whole or not at all.
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta(key, value) VALUES {meta_rows};"
                    " COMMIT;"
                )
            except sqlite3.OperationalError as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if "already exists" not in str(e):
                    raise
                self._setup()  # another process created it between our look and our lock
            return
        if "meta" not in tables:
            raise RagError(f"{self.path} is an SQLite file but not a falconet RAG store")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != SCHEMA_NAME:
            raise RagError(f"{self.path} is an SQLite file but not a falconet RAG store")
        version = int(meta.get("schema_version", "0"))
        if version != SCHEMA_VERSION:
            raise RagError(
                f"{self.path} has store schema {version}; this falconet reads schema "
                f"{SCHEMA_VERSION}: use a matching falconet or ingest into a new store"
            )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (also on SIGKILL)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._matrix = None
        self._df = None
        self._ann = None
        self._db.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def total_changes(self) -> int:
        """Rows this connection has written (tests: re-ingesting unchanged files adds 0)."""
        return self._db.total_changes

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def embedder_id(self) -> str | None:
        """The embedder all vectors are from (during a switch: the one being replaced)."""
        return self._meta("embedder")

    @property
    def dim(self) -> int | None:
        value = self._meta("dim")
        return None if value is None else int(value)

    def set_embedder(self, embedder: str, dim: int) -> None:
        if self.embedder_id == embedder and self.dim == dim:
            return
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [("embedder", embedder), ("dim", str(dim))],
            )

    # -- documents -------------------------------------------------------------------

    _DOC_COLUMNS = (
        "d.id, d.source, d.sha256, d.version, d.size, d.mtime_ns, d.embedder, d.ingested_at, "
        "(SELECT count(*) FROM chunks c WHERE c.doc_id = d.id)"
    )

    def documents(self) -> list[StoredDocument]:
        rows = self._db.execute(f"SELECT {self._DOC_COLUMNS} FROM documents d ORDER BY d.source")
        return [StoredDocument(*r) for r in rows]

    def document(self, id_or_source: str) -> StoredDocument | None:
        """By id, by source path (as given or resolved), or by a unique id prefix (>= 6)."""
        q = f"SELECT {self._DOC_COLUMNS} FROM documents d WHERE "
        keys = [id_or_source]
        with suppress(OSError, RuntimeError, ValueError):
            keys.append(str(Path(id_or_source).expanduser().resolve()))
        for key in keys:
            row = self._db.execute(q + "d.id = ? OR d.source = ?", (key, key)).fetchone()
            if row:
                return StoredDocument(*row)
        if len(id_or_source) >= 6 and re.fullmatch(r"[0-9a-f]+", id_or_source):
            rows = self._db.execute(
                q + "d.id >= ? AND d.id < ? LIMIT 2", (id_or_source, id_or_source + "g")
            ).fetchall()
            if len(rows) > 1:
                raise RagError(f"{id_or_source!r} is the start of several document ids")
            if rows:
                return StoredDocument(*rows[0])
        return None

    def upsert_document(
        self, meta: DocMeta, chunks: Sequence[ChunkLike], vectors: np.ndarray
    ) -> StoredDocument:
        """Replace a document's chunks, vectors and FTS rows and bump its version, in one
        transaction: on any error nothing of the document changes. The same bytes from
        the same embedder already stored (another process was first) write nothing."""
        vectors = checked_vectors(vectors, len(chunks), meta.source)
        doc_id = document_id(meta.source)
        with suppress(_Unchanged), self._write() as db:
            if self.embedder_id is None:  # the first document fixes the store's embedder
                db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("embedder", meta.embedder), ("dim", str(vectors.shape[1]))],
                )
            dim = vectors.shape[1] if meta.embedder != self.embedder_id else self.dim
            old = db.execute(
                "SELECT version, sha256, embedder FROM documents WHERE id = ?", (doc_id,)
            ).fetchone()
            if old is not None and old[1:] == (meta.sha256, meta.embedder):
                raise _Unchanged  # another process stored these bytes first: write nothing
            version = 1 if old is None else old[0] + 1
            self._delete_rows(db, doc_id)
            db.execute(
                "INSERT OR REPLACE INTO documents(id, source, sha256, version, size, mtime_ns, "
                "embedder, ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (doc_id, meta.source, meta.sha256, version, meta.size, meta.mtime_ns,
                 meta.embedder, time.time()),
            )  # fmt: skip
            for i, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True)):
                cid = chunk_id(doc_id, meta.sha256, i, chunk.start, chunk.end)
                db.execute(
                    'INSERT INTO chunks(id, doc_id, ord, text, start, "end", section, page) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, doc_id, i, chunk.text, chunk.start, chunk.end, chunk.section, chunk.page),
                )
                db.execute(
                    "INSERT INTO embeddings(chunk_id, vector) VALUES (?, ?)",
                    (cid, _vector_bytes(vector, dim, meta.source)),
                )
        found = self.document(doc_id)
        assert found is not None
        return found

    def remove_document(self, id_or_source: str) -> StoredDocument:
        doc = self.document(id_or_source)
        if doc is None:
            raise RagError(f"no document {id_or_source!r} in the store (see `falconet rag list`)")
        with self._write() as db:
            self._delete_rows(db, doc.id)
            db.execute("DELETE FROM documents WHERE id = ?", (doc.id,))
        return doc

    @staticmethod
    def _delete_rows(db: sqlite3.Connection, doc_id: str) -> None:
        db.execute(
            "DELETE FROM embeddings WHERE chunk_id IN (SELECT id FROM chunks WHERE doc_id = ?)",
            (doc_id,),
        )
        db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))  # triggers clear FTS rows

    def chunk_texts(self, doc_id: str) -> list[tuple[str, str]]:
        """(chunk id, text) of a document's chunks, in order."""
        rows = self._db.execute(
            "SELECT id, text FROM chunks WHERE doc_id = ? ORDER BY ord", (doc_id,)
        )
        return rows.fetchall()

    def replace_embeddings(
        self, doc_id: str, embedder: str, chunk_ids: Sequence[str], vectors: np.ndarray
    ) -> None:
        """New vectors, computed for `chunk_ids` (from `chunk_texts`), for all of a
        document's chunks (an embedder switch), in one transaction."""
        vectors = checked_vectors(vectors, len(chunk_ids), f"document {doc_id}")
        with self._write() as db:
            current = [r[0] for r in db.execute(
                "SELECT id FROM chunks WHERE doc_id = ? ORDER BY ord", (doc_id,)
            )]  # fmt: skip
            if current != list(chunk_ids):
                raise RagError(
                    f"document {doc_id} changed while it was being re-embedded; run again"
                )
            for cid, vector in zip(chunk_ids, vectors, strict=True):
                db.execute(
                    "UPDATE embeddings SET vector = ? WHERE chunk_id = ?",
                    (_vector_bytes(vector, vectors.shape[1], doc_id), cid),
                )
            db.execute("UPDATE documents SET embedder = ? WHERE id = ?", (embedder, doc_id))

    # -- search ----------------------------------------------------------------------

    _HIT_COLUMNS = 'c.id, c.doc_id, d.source, c.ord, c.text, c.start, c."end", c.section, c.page'

    def _document_frequencies(self, terms: Sequence[str]) -> tuple[int, dict[str, int]]:
        """(chunks in the store, term -> chunks containing it) for `terms`, read from the
        FTS5 vocabulary; cached until any process commits a write (the generation moves)."""
        generation = self._meta("generation")
        if self._df is None or self._df[0] != generation:
            n = self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            self._df = (generation, n, {})
        _, n, df = self._df
        keys = {t: _vocab_key(t) for t in terms if t not in df}
        if keys:
            self._fts_vocab()
            wanted = sorted(set(keys.values()))
            found: dict[str, int] = {}
            for i in range(0, len(wanted), 500):  # under SQLite's limit on parameters
                part = wanted[i : i + 500]
                found.update(
                    self._db.execute(
                        "SELECT term, doc FROM temp.fts_vocab WHERE term IN "
                        f"({','.join('?' * len(part))})",
                        part,
                    ).fetchall()
                )
            for t, key in keys.items():
                df[t] = found.get(key, 0)
        return n, {t: df[t] for t in terms}

    def bm25_terms(self, query: str) -> list[str]:
        """The query's words that BM25 searches for, rarest first (see
        `falconet.rag.store.choose_bm25_terms`)."""
        terms = query_terms(query)
        if len(terms) <= 1:
            return terms
        return choose_bm25_terms(terms, *self._document_frequencies(terms))

    def search_bm25(self, query: str, k: int) -> list[Hit]:
        """BM25 over chunk text; any string is a valid query (see `fts_query`). Only the
        rarer query words are searched for (see `bm25_terms`)."""
        if k <= 0:
            return []
        match = fts_query(query, self.bm25_terms(query))
        if match is None:
            return []
        # The top k first, then the joins: joining every matching row before the sort
        # cost ~40 % more at 100k chunks. Ties in score go to the earlier chunk row.
        rows = self._db.execute(
            f"SELECT {self._HIT_COLUMNS}, -f.score FROM (SELECT rowid, bm25(chunks_fts) AS score "
            "FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY score, rowid LIMIT ?) f "
            "JOIN chunks c ON c.rowid = f.rowid JOIN documents d ON d.id = c.doc_id "
            "ORDER BY f.score, f.rowid",
            (match, k),
        )
        return [Hit(*r) for r in rows]

    def _vector_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk rowids, unit-norm matrix) of the vectors from the store's embedder, cached
        until any process commits a write (the meta generation counter moves)."""
        generation, embedder = self._meta("generation"), self.embedder_id
        if self._matrix is not None and self._matrix[:2] == (generation, embedder):
            return self._matrix[2], self._matrix[3]
        rows = self._db.execute(
            "SELECT c.rowid, e.vector FROM embeddings e JOIN chunks c ON c.id = e.chunk_id "
            "JOIN documents d ON d.id = c.doc_id WHERE d.embedder = ? ORDER BY c.rowid",
            (embedder,),
        ).fetchall()
        rowids = np.array([r[0] for r in rows], dtype=np.int64)
        if rows:
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
        else:
            matrix = np.zeros((0, self.dim or 0), dtype=np.float32)
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        self._matrix = (generation, embedder, rowids, matrix)
        return rowids, matrix

    def write_state(self) -> tuple[str | None, str | None]:
        """(write counter, embedder id) of the last committed write: what caches key on."""
        return self._meta("generation"), self.embedder_id

    def vector_snapshot(self) -> tuple[str | None, str | None, np.ndarray, np.ndarray]:
        """(write counter, embedder, chunk rowids, unit-norm matrix), all read in one read
        transaction, so they reflect one committed state (for the ANN index)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                generation, embedder = self.write_state()
                rowids, matrix = self._vector_matrix()
            finally:
                self._db.execute("COMMIT")
        return generation, embedder, rowids, matrix

    def search_vector(self, vector: np.ndarray, k: int, ann: bool = False) -> list[Hit]:
        """Exact cosine similarity against every stored vector of the store's embedder;
        with `ann`, the candidates come from the usearch index (falconet.rag.ann), a
        rebuildable cache, and their scores are recomputed exactly from the stored vectors."""
        if ann:
            return self._search_ann(vector, k)
        rowids, matrix = self._vector_matrix()
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if len(rowids) == 0 or k <= 0:
            return []
        if q.shape[0] != matrix.shape[1]:
            raise RagError(
                f"query vector has {q.shape[0]} dimensions; the store's embedder "
                f"{self.embedder_id} has {matrix.shape[1]}"
            )
        scores = matrix @ (q / max(float(np.linalg.norm(q)), 1e-12))
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((rowids[top], -scores[top]))]  # best first; ties by rowid
        by_rowid = {
            r[0]: r[1:]
            for r in self._db.execute(
                f"SELECT c.rowid, {self._HIT_COLUMNS} FROM chunks c "
                f"JOIN documents d ON d.id = c.doc_id WHERE c.rowid IN "
                f"({','.join('?' * len(top))})",
                [int(rowids[i]) for i in top],
            )
        }
        return [
            Hit(*by_rowid[int(rowids[i])], score=float(scores[i]))
            for i in top
            if int(rowids[i]) in by_rowid
        ]

    def ann_index(self) -> AnnIndex:
        """The usearch index, kept in memory while the committed state is unchanged."""
        cached = self._ann
        if cached is not None and (cached.generation, cached.embedder) == self.write_state():
            return cached
        self._ann = AnnIndex.load_or_build(self)
        return self._ann

    def _search_ann(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k <= 0:
            return []
        index = self.ann_index()
        keys, _ = index.search(vector, k)
        if len(keys) == 0:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        hits = []
        for r in self._db.execute(
            f"SELECT {self._HIT_COLUMNS}, c.rowid, e.vector FROM chunks c "
            "JOIN documents d ON d.id = c.doc_id JOIN embeddings e ON e.chunk_id = c.id "
            f"WHERE d.embedder = ? AND c.rowid IN ({','.join('?' * len(keys))})",
            [index.embedder, *(int(key) for key in keys)],
        ):
            v = np.frombuffer(r[-1], dtype="<f4")
            score = float(v @ q) / max(float(np.linalg.norm(v)), 1e-12)
            hits.append((-score, r[-2], Hit(*r[:-2], score=score)))
        hits.sort(key=lambda h: h[:2])  # best first; ties by rowid, as the exact path
        return [h[2] for h in hits]

    # -- checks ----------------------------------------------------------------------

    def checksum(self, versions: bool = True) -> str:
        """A digest of every stored row (not timestamps or rowids) and of the FTS index's
        terms: two stores with the same content have the same checksum."""
        h = hashlib.sha256()
        version = "d.version" if versions else "0"
        queries = [
            f"SELECT d.id, d.source, d.sha256, {version}, d.size, d.mtime_ns, d.embedder "
            "FROM documents d ORDER BY d.id",
            'SELECT id, doc_id, ord, text, start, "end", section, page FROM chunks ORDER BY id',
            "SELECT chunk_id, vector FROM embeddings ORDER BY chunk_id",
            "SELECT key, value FROM meta WHERE key IN ('embedder', 'dim') ORDER BY key",
        ]
        for q in queries:
            h.update(q.encode())
            for row in self._db.execute(q):
                h.update(repr(row).encode())
        for row in self.fts_terms():
            h.update(repr(row).encode())
        return h.hexdigest()

    def _fts_vocab(self) -> None:
        """A per-connection (temp) fts5vocab table over the index; the file is unchanged."""
        self._db.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.fts_vocab USING fts5vocab(main, chunks_fts, row)"
        )

    def fts_terms(self) -> list[tuple[str, int, int]]:
        """(term, chunks containing it, occurrences) read from the FTS index itself."""
        self._fts_vocab()
        return self._db.execute(
            "SELECT term, doc, cnt FROM temp.fts_vocab ORDER BY term"
        ).fetchall()

    def integrity_check(self) -> list[str]:
        """Problems found (empty: all good): SQLite's own check, foreign keys, and the FTS
        index against the chunk table."""
        problems = [r[0] for r in self._db.execute("PRAGMA integrity_check")]
        if problems == ["ok"]:
            problems = []
        problems += [f"foreign key: {r}" for r in self._db.execute("PRAGMA foreign_key_check")]
        try:
            self._db.execute(
                "INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)"
            )
        except sqlite3.DatabaseError as e:
            problems.append(f"FTS index: {e}")
        orphans = self._db.execute(
            "SELECT count(*) FROM chunks c LEFT JOIN embeddings e ON e.chunk_id = c.id "
            "WHERE e.chunk_id IS NULL"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunks without an embedding")
        return problems


def _vector_bytes(vector: np.ndarray, dim: int | None, where: str) -> bytes:
    return checked_vector(vector, dim, where).astype("<f4").tobytes()


def open_folder(folder: str | Path, create: bool = True) -> SQLiteStore:
    """The store in `folder` (its file is `store.sqlite3`)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RagError(
            f"--store {folder} is a file; give a folder (the store is {STORE_FILE} inside)"
        )
    return SQLiteStore(folder / STORE_FILE, create=create)
