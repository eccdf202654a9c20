"""The PostgreSQL `DocumentStore`: one store that several processes or machines share.

`falconet serve` replicas and `falconet rag` commands pointed at the same
`postgresql://` URL read and write one store. It behaves as the SQLite store does:

- Exactly once. A document is keyed by the sha256 of its source path and its version by
  the content sha256; everything it owns is written in one transaction, which first
  takes the row lock of the store's write counter (`meta.generation`, `FOR UPDATE`).
  Writers so run one after another, as SQLite's `BEGIN IMMEDIATE` makes them, and each
  reads the committed state only once it holds the lock (READ COMMITTED takes a new
  snapshot per statement): a process that finds the same bytes already stored writes
  nothing, so two processes ingesting one folder store every document once, at version 1.
  Embedding happens before, outside any transaction.
- The same BM25. Chunks are tokenized here as SQLite's FTS5 `unicode61 remove_diacritics
  2` tokenizer does (`fts_tokens`) into an inverted index, `postings` (term, chunk, term
  frequency, chunk length), whose primary key a query reads for its words only; the score
  is FTS5's bm25() (k1 = 1.2, b = 0.75) with the per-term chunk counts in `terms`, kept
  exact by every write. (A `tsvector` with `ts_rank_cd` ranks otherwise, and unnesting
  tsvectors to get BM25's term frequencies cost ~100 ms at 2,000 chunks.) The
  same chunks therefore rank the same on both backends, and hybrid search fuses the same
  rankings by the same RRF (falconet/rag/retrieve.py). One difference: a query word the
  tokenizer cuts in two ("a_b") is FTS5's phrase "a b" but is searched here as a and b.
- Vectors are pgvector `vector` columns. Below EXACT_SEARCH_MAX_CHUNKS chunks a search
  is an exact cosine scan; above it (or with `ann=True`) it walks an HNSW cosine index,
  built per embedding size as a partial expression index, since one column holds the
  vectors of two embedders during a switch.
- Migrations are numbered; `migrations` records those applied, and opening a store
  applies the missing ones under an advisory lock, all in one transaction.

Each store lives in its own schema (default `falconet_rag`; `?schema=NAME` on the URL or
the `schema` argument), so one database holds many isolated stores (one per collection).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from falconet.errors import RagError, StoreUnavailableError
from falconet.rag.postgres_schema import (
    first_line,
    fts_tokens,
    parse_url,
    prepare,
)
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

CONNECT_TIMEOUT_S = 10
# Exact cosine scans of 384-d vectors took 2.6 / 28 / 45 ms (p50) at 2k / 20k / 50k rows on
# the dev machine (2 cores, load average 3); above 20k the HNSW index answers.
EXACT_SEARCH_MAX_CHUNKS = 20_000
HNSW_EF_SEARCH_MIN = 100  # pgvector's default (40) loses recall at k = 20
BM25_K1 = 1.2  # FTS5's bm25() constants
BM25_B = 0.75


def nearest_sql(dim: int, hnsw: bool) -> str:
    """The k nearest chunks (rowid, cosine distance) to a query vector (the first two
    parameters; the third is k). With `hnsw` the ORDER BY is the expression the index
    `chunks_embedding_hnsw_<dim>` was built on, so PostgreSQL walks that index; without,
    no index matches and it scans exactly, ties by rowid."""
    if hnsw:
        return (f"SELECT rowid, embedding::vector({dim}) <=> %s::vector({dim}) AS dist "
                f"FROM chunks WHERE dim = {dim} ORDER BY embedding::vector({dim}) <=> "
                f"%s::vector({dim}) LIMIT %s")  # fmt: skip
    return (f"SELECT rowid, embedding <=> %s AS dist FROM chunks WHERE dim = {dim} "
            "ORDER BY embedding <=> %s, rowid LIMIT %s")  # fmt: skip


class _Tx:
    changed = True  # False: nothing was written, the write counter stays


class PostgresStore:
    """A `DocumentStore` in a PostgreSQL schema. One connection; not shared between threads."""

    def __init__(self, url: str, create: bool = True, schema: str | None = None):
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError as e:
            raise RagError(
                "a PostgreSQL store needs psycopg and pgvector: pip install falconet[postgres]"
            ) from e
        self._psycopg = psycopg
        self._register_vector = register_vector
        self.location = parse_url(url, schema)
        self.schema = self.location.schema
        self.conn = self._connect()
        self._search_path = ""
        self._lock = threading.Lock()
        self._changes = 0
        self._df: tuple[str | None, dict[str, int]] | None = None
        try:
            with self._errors():
                self._setup(create)
                register_vector(self.conn)
        except BaseException:
            self.conn.close()
            raise

    # -- opening ---------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """psycopg's errors as RagErrors that say which store (a lost connection, a
        refused privilege, a server shutting down)."""
        if self.conn.closed and self._search_path:  # dropped (a server restart): reopen
            conn = self._connect()
            try:
                conn.execute(self._search_path)
                self._register_vector(conn)
            except self._psycopg.Error as e:
                conn.close()
                raise StoreUnavailableError(
                    f"the RAG store at {self.location.display}: {first_line(e)}"
                ) from e
            self.conn = conn
        try:
            yield
        except self._psycopg.Error as e:
            # OperationalError: the server went away, shut down, or refused the connection
            kind = (
                StoreUnavailableError if isinstance(e, self._psycopg.OperationalError) else RagError
            )
            raise kind(f"the RAG store at {self.location.display} (schema {self.schema}): "
                       f"{first_line(e)}") from e  # fmt: skip

    def _connect(self):
        try:
            return self._psycopg.connect(self.location.url, autocommit=True,
                                         connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="falconet")  # fmt: skip
        except self._psycopg.Error as e:
            raise StoreUnavailableError(f"cannot connect to the RAG store at "
                                        f"{self.location.display}: {first_line(e)}") from None  # fmt: skip

    def _setup(self, create: bool) -> None:
        self._search_path = prepare(self.conn, self.location, create)

    @contextmanager
    def _write(self) -> Iterator[_Tx]:
        """One write transaction, holding the store's writer lock: all of it commits, or
        none of it (also when the process is killed: the server rolls it back)."""
        tx = _Tx()
        with self._lock, self._errors(), self.conn.transaction():
            self.conn.execute("SELECT value FROM meta WHERE key = 'generation' FOR UPDATE")
            yield tx
            if tx.changed:
                self._do(
                    "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation'"
                )

    def _do(self, sql: str, params: Sequence | None = None) -> int:
        """A write statement; its rows are counted (`total_changes`)."""
        cur = self.conn.execute(sql, params)
        self._changes += max(cur.rowcount, 0)
        return cur.rowcount

    def close(self) -> None:
        self._df = None
        self.conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def total_changes(self) -> int:
        """Rows this store object has written, committed or not (tests)."""
        return self._changes

    def _meta(self, key: str) -> str | None:
        with self._errors():
            row = self.conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def embedder_id(self) -> str | None:
        """The embedder all vectors are from (during a switch: the one being replaced)."""
        return self._meta("embedder")

    @property
    def dim(self) -> int | None:
        value = self._meta("dim")
        return None if value is None else int(value)

    def write_state(self) -> tuple[str | None, str | None]:
        """(write counter, embedder id) of the last committed write: what caches key on."""
        return self._meta("generation"), self.embedder_id

    def set_embedder(self, embedder: str, dim: int) -> None:
        if self.embedder_id == embedder and self.dim == dim:
            return
        with self._write():
            self._set_embedder(embedder, dim)
            # Vectors of other sizes are gone now (every document was re-embedded).
            for (name,) in self.conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND indexname LIKE "
                "'chunks_embedding_hnsw_%%' AND indexname <> %s",
                (self.schema, f"chunks_embedding_hnsw_{dim}"),
            ).fetchall():
                self.conn.execute(f'DROP INDEX "{name}"')

    def _set_embedder(self, embedder: str, dim: int) -> None:
        self._do("INSERT INTO meta (key, value) VALUES ('embedder', %s), ('dim', %s) ON CONFLICT "
                 "(key) DO UPDATE SET value = excluded.value", (embedder, str(dim)))  # fmt: skip
        self._hnsw_index(dim)

    def _hnsw_index(self, dim: int) -> None:
        """The HNSW cosine index over the vectors of `dim` dimensions (partial: a switch
        to another embedder stores vectors of two sizes in one column for a while)."""
        dim = int(dim)
        self.conn.execute(
            f"CREATE INDEX IF NOT EXISTS chunks_embedding_hnsw_{dim} ON chunks USING hnsw "
            f"((embedding::vector({dim})) vector_cosine_ops) WHERE dim = {dim}"
        )

    # -- documents -------------------------------------------------------------------

    _DOC_COLUMNS = (
        "d.id, d.source, d.sha256, d.version, d.size, d.mtime_ns, d.embedder, d.ingested_at, "
        "(SELECT count(*) FROM chunks c WHERE c.doc_id = d.id)"
    )

    def documents(self) -> list[StoredDocument]:
        with self._errors():
            rows = self.conn.execute(
                f'SELECT {self._DOC_COLUMNS} FROM documents d ORDER BY d.source COLLATE "C"'
            ).fetchall()
        return [StoredDocument(*r) for r in rows]

    def document(self, id_or_source: str) -> StoredDocument | None:
        """By id, by source path (as given or resolved), or by a unique id prefix (>= 6)."""
        q = f"SELECT {self._DOC_COLUMNS} FROM documents d WHERE "
        keys = [id_or_source]
        with suppress(OSError, RuntimeError, ValueError):
            keys.append(str(Path(id_or_source).expanduser().resolve()))
        keys = [k for k in keys if "\x00" not in k]  # PostgreSQL text cannot hold NUL
        with self._errors():
            for key in keys:
                row = self.conn.execute(q + "d.id = %s OR d.source = %s", (key, key)).fetchone()
                if row:
                    return StoredDocument(*row)
            if len(id_or_source) >= 6 and re.fullmatch(r"[0-9a-f]+", id_or_source):
                rows = self.conn.execute(
                    q + 'd.id COLLATE "C" >= %s AND d.id COLLATE "C" < %s LIMIT 2',
                    (id_or_source, id_or_source + "g"),
                ).fetchall()
                if len(rows) > 1:
                    raise RagError(f"{id_or_source!r} is the start of several document ids")
                if rows:
                    return StoredDocument(*rows[0])
        return None

    def upsert_document(
        self, meta: DocMeta, chunks: Sequence[ChunkLike], vectors: np.ndarray
    ) -> StoredDocument:
        """Replace a document's chunks, vectors and terms and bump its version, in one
        transaction: on any error nothing of the document changes. The same bytes from
        the same embedder already stored (another process was first) write nothing."""
        from pgvector import Vector

        vectors = checked_vectors(vectors, len(chunks), meta.source)
        doc_id = document_id(meta.source)
        with self._write() as tx:
            embedder, dim = self.embedder_id, self.dim
            if embedder is None:  # the first document fixes the store's embedder
                embedder, dim = meta.embedder, int(vectors.shape[1])
                self._set_embedder(embedder, dim)
            if meta.embedder != embedder:  # a switch under way: the new size is indexed too
                dim = int(vectors.shape[1])
                self._hnsw_index(dim)
            old = self.conn.execute(
                "SELECT version, sha256, embedder FROM documents WHERE id = %s", (doc_id,)
            ).fetchone()
            if old is not None and old[1:] == (meta.sha256, meta.embedder):
                tx.changed = False
            else:
                self._delete_rows(doc_id)
                self._do(
                    "INSERT INTO documents (id, source, sha256, version, size, mtime_ns, "
                    "embedder, ingested_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET sha256 = excluded.sha256, version = "
                    "excluded.version, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "embedder = excluded.embedder, ingested_at = excluded.ingested_at",
                    (doc_id, meta.source, meta.sha256, 1 if old is None else old[0] + 1,
                     meta.size, meta.mtime_ns, meta.embedder, time.time()),
                )  # fmt: skip
                tokens_total = 0
                postings: list[tuple[str, int, int, int]] = []
                for i, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True)):
                    text = chunk.text
                    if "\x00" in text:
                        raise RagError(f"{meta.source}: a NUL character in its text")
                    tokens = fts_tokens(text)
                    tokens_total += len(tokens)
                    v = checked_vector(vector, dim, meta.source)
                    (rowid,) = self.conn.execute(
                        'INSERT INTO chunks (id, doc_id, ord, text, start, "end", section, '
                        "page, tokens, dim, embedding) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING rowid",
                        (chunk_id(doc_id, meta.sha256, i, chunk.start, chunk.end), doc_id, i,
                         text, chunk.start, chunk.end, chunk.section, chunk.page,
                         len(tokens), len(v), Vector(v)),
                    ).fetchone()  # fmt: skip
                    self._changes += 1
                    postings.extend(
                        (t, rowid, tf, len(tokens)) for t, tf in Counter(tokens).items()
                    )
                with self.conn.cursor().copy(
                    "COPY postings (term, chunk, tf, dl) FROM STDIN"
                ) as copy:
                    for row in postings:
                        copy.write_row(row)
                self._changes += len(postings)
                self._count_terms(doc_id, +1)
                self._add_totals(len(chunks), tokens_total)
        found = self.document(doc_id)
        assert found is not None
        return found

    def _count_terms(self, doc_id: str, sign: int) -> None:
        """Add (+1) or take away (-1) a document's chunks from the per-term counts."""
        self._do(
            "INSERT INTO terms AS t (term, chunks, occurrences) "
            "SELECT p.term, %s * count(*), %s * sum(p.tf) FROM postings p JOIN chunks c "
            "ON c.rowid = p.chunk WHERE c.doc_id = %s GROUP BY p.term "
            "ON CONFLICT (term) DO UPDATE SET chunks = t.chunks + excluded.chunks, "
            "occurrences = t.occurrences + excluded.occurrences",
            (sign, sign, doc_id),
        )
        if sign < 0:
            self._do("DELETE FROM terms WHERE chunks <= 0")

    def _add_totals(self, chunks: int, tokens: int) -> None:
        self._do(
            "UPDATE meta SET value = (value::bigint + %s)::text WHERE key = 'chunks'", (chunks,)
        )
        self._do(
            "UPDATE meta SET value = (value::bigint + %s)::text WHERE key = 'tokens'", (tokens,)
        )

    def _delete_rows(self, doc_id: str) -> None:
        n, tokens = self.conn.execute(
            "SELECT count(*), coalesce(sum(tokens), 0) FROM chunks WHERE doc_id = %s", (doc_id,)
        ).fetchone()
        if n:
            self._count_terms(doc_id, -1)
            self._add_totals(-n, -tokens)
            self._do("DELETE FROM chunks WHERE doc_id = %s", (doc_id,))

    def remove_document(self, id_or_source: str) -> StoredDocument:
        doc = self.document(id_or_source)
        if doc is None:
            raise RagError(f"no document {id_or_source!r} in the store (see `falconet rag list`)")
        with self._write():
            self._delete_rows(doc.id)
            self._do("DELETE FROM documents WHERE id = %s", (doc.id,))
        return doc

    def chunk_texts(self, doc_id: str) -> list[tuple[str, str]]:
        """(chunk id, text) of a document's chunks, in order."""
        with self._errors():
            return self.conn.execute(
                "SELECT id, text FROM chunks WHERE doc_id = %s ORDER BY ord", (doc_id,)
            ).fetchall()

    def replace_embeddings(
        self, doc_id: str, embedder: str, chunk_ids: Sequence[str], vectors: np.ndarray
    ) -> None:
        """New vectors, computed for `chunk_ids` (from `chunk_texts`), for all of a
        document's chunks (an embedder switch), in one transaction."""
        from pgvector import Vector

        vectors = checked_vectors(vectors, len(chunk_ids), f"document {doc_id}")
        with self._write():
            current = [r[0] for r in self.conn.execute(
                "SELECT id FROM chunks WHERE doc_id = %s ORDER BY ord", (doc_id,))]  # fmt: skip
            if current != list(chunk_ids):
                raise RagError(
                    f"document {doc_id} changed while it was being re-embedded; run again"
                )
            self._hnsw_index(vectors.shape[1])
            for cid, vector in zip(chunk_ids, vectors, strict=True):
                v = checked_vector(vector, vectors.shape[1], doc_id)
                self._do("UPDATE chunks SET embedding = %s, dim = %s WHERE id = %s",
                         (Vector(v), len(v), cid))  # fmt: skip
            self._do("UPDATE documents SET embedder = %s WHERE id = %s", (embedder, doc_id))

    # -- search ----------------------------------------------------------------------

    _HIT_COLUMNS = 'c.id, c.doc_id, d.source, c.ord, c.text, c.start, c."end", c.section, c.page'

    def _statistics(self, lexemes: Sequence[str]) -> tuple[int, float, dict[str, int]]:
        """(chunks, mean tokens per chunk, lexeme -> chunks holding it), one snapshot;
        cached until any process commits a write (the generation moves)."""
        with self._errors(), self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = dict(self.conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('generation', 'chunks', 'tokens')"
            ).fetchall())  # fmt: skip
            if self._df is None or self._df[0] != meta["generation"]:
                self._df = (meta["generation"], {})
            df = self._df[1]
            wanted = [t for t in dict.fromkeys(lexemes) if t not in df]
            if wanted:
                found = dict(self.conn.execute(
                    "SELECT term, chunks FROM terms WHERE term = ANY(%s)", (wanted,)
                ).fetchall())  # fmt: skip
                df.update({t: found.get(t, 0) for t in wanted})
        n, tokens = int(meta["chunks"]), int(meta["tokens"])
        return n, tokens / max(n, 1), {t: df[t] for t in lexemes}

    def bm25_terms(self, query: str) -> list[str]:
        """The query's words that BM25 searches for, rarest first (see
        `falconet.rag.store.choose_bm25_terms`)."""
        terms = query_terms(query)
        if len(terms) <= 1:
            return terms
        # A word the tokenizer cuts in two ("a_b") counts as absent, as in FTS5's vocabulary.
        single = {t: tokens[0] for t in terms if len(tokens := fts_tokens(t)) == 1}
        n, _, df = self._statistics(list(single.values()))
        return choose_bm25_terms(terms, n, {t: df[single[t]] if t in single else 0 for t in terms})

    def search_bm25(self, query: str, k: int) -> list[Hit]:
        """FTS5's BM25 over the chunks' tokens; any string is a valid query. Only the rarer
        query words are searched for (see `bm25_terms`)."""
        if k <= 0:
            return []
        lexemes = list(dict.fromkeys(t for w in self.bm25_terms(query) for t in fts_tokens(w)))
        if not lexemes:
            return []
        n, avgdl, df = self._statistics(lexemes)
        lexemes = [t for t in lexemes if df[t]]
        if not lexemes:
            return []
        idf = [max(float(np.log((n - df[t] + 0.5) / (df[t] + 0.5))), 1e-6) for t in lexemes]
        with self._errors():
            rows = self.conn.execute(
                f"WITH q (term, idf) AS (SELECT * FROM unnest(%s::text[], %s::float8[])), "
                "ranked AS (SELECT p.chunk AS rowid, sum(q.idf * p.tf * %s / (p.tf + %s * "
                "(1 - %s + %s * p.dl / %s))) AS score FROM q JOIN postings p ON p.term = q.term "
                "GROUP BY p.chunk ORDER BY score DESC, p.chunk LIMIT %s) "
                f"SELECT {self._HIT_COLUMNS}, r.score FROM ranked r JOIN chunks c ON c.rowid = "
                "r.rowid JOIN documents d ON d.id = c.doc_id ORDER BY r.score DESC, r.rowid",
                (lexemes, idf, BM25_K1 + 1, BM25_K1, BM25_B, BM25_B, avgdl, k),
            ).fetchall()
        return [Hit(*r) for r in rows]

    def search_vector(self, vector: np.ndarray, k: int, ann: bool = False) -> list[Hit]:
        """Cosine similarity against the vectors of the store's embedder: an exact scan
        while the store has at most EXACT_SEARCH_MAX_CHUNKS chunks, the HNSW index above
        that or with `ann`. Scores are exact either way."""
        from pgvector import Vector

        with self._errors():  # one round trip for what the query needs to know
            meta = dict(self.conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('embedder', 'dim', 'chunks')"
            ).fetchall())  # fmt: skip
        embedder, dim = meta.get("embedder"), int(meta.get("dim", 0)) or None
        if k <= 0 or embedder is None or dim is None:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != dim:
            raise RagError(f"query vector has {q.shape[0]} dimensions; the store's embedder "
                           f"{embedder} has {dim}")  # fmt: skip
        q = Vector(checked_vector(q, dim, "the query"))
        chunks = int(meta["chunks"])
        with self._errors(), self.conn.transaction():
            if ann or chunks > EXACT_SEARCH_MAX_CHUNKS:
                # The index orders by the expression it was built on (the cast); ties and
                # the embedder filter are settled on the candidates it returns.
                self.conn.execute("SELECT set_config('hnsw.ef_search', %s, true)",
                                  (str(min(max(HNSW_EF_SEARCH_MIN, 2 * k), 1000)),))  # fmt: skip
                inner = nearest_sql(int(dim), hnsw=True)
            else:
                inner = nearest_sql(int(dim), hnsw=False)
            params = (q, q, k)
            rows = self.conn.execute(
                f"SELECT {self._HIT_COLUMNS}, 1 - n.dist, n.rowid FROM ({inner}) n "
                "JOIN chunks c ON c.rowid = n.rowid JOIN documents d ON d.id = c.doc_id "
                "WHERE d.embedder = %s",
                (*params, embedder),
            ).fetchall()
        rows.sort(key=lambda r: (-r[-2], r[-1]))  # best first; ties by rowid
        return [Hit(*r[:-1]) for r in rows]

    # -- checks ----------------------------------------------------------------------

    def checksum(self, versions: bool = True) -> str:
        """A digest of every stored row (not timestamps or rowids) and of the term counts:
        two stores with the same content have the same checksum."""
        h = hashlib.sha256()
        version = "d.version" if versions else "0"
        queries = [
            f"SELECT d.id, d.source, d.sha256, {version}, d.size, d.mtime_ns, d.embedder "
            'FROM documents d ORDER BY d.id COLLATE "C"',
            'SELECT id, doc_id, ord, text, start, "end", section, page FROM chunks '
            'ORDER BY id COLLATE "C"',
            "SELECT key, value FROM meta WHERE key IN ('embedder', 'dim') ORDER BY key COLLATE \"C\"",
        ]
        with self._errors(), self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for q in queries:
                h.update(q.encode())
                for row in self.conn.execute(q):
                    h.update(repr(row).encode())
            for cid, v in self.conn.execute(
                'SELECT id, embedding FROM chunks ORDER BY id COLLATE "C"'
            ):
                h.update(cid.encode() + np.asarray(v.to_numpy(), dtype="<f4").tobytes())
            for row in self.conn.execute(
                'SELECT term, chunks, occurrences FROM terms ORDER BY term COLLATE "C"'
            ):
                h.update(repr(tuple(row)).encode())
        return h.hexdigest()

    def fts_terms(self) -> list[tuple[str, int, int]]:
        """(term, chunks containing it, occurrences), as SQLiteStore.fts_terms."""
        with self._errors():
            return [tuple(r) for r in self.conn.execute(
                'SELECT term, chunks, occurrences FROM terms ORDER BY term COLLATE "C"')]  # fmt: skip

    def integrity_check(self) -> list[str]:
        """Problems found (empty: all good): the term counts and totals against the
        chunks, vector sizes, chunks without a document."""
        problems = []
        with self._errors(), self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (bad_terms,) = self.conn.execute(
                "SELECT count(*) FROM (SELECT term, count(*) AS chunks, sum(tf) AS occurrences "
                "FROM postings GROUP BY term) a FULL JOIN terms t USING (term) WHERE a.chunks IS DISTINCT "
                "FROM t.chunks OR a.occurrences IS DISTINCT FROM t.occurrences"
            ).fetchone()
            if bad_terms:
                problems.append(f"term counts: {bad_terms} terms disagree with the postings")
            (bad_postings,) = self.conn.execute(
                "SELECT count(*) FROM chunks c LEFT JOIN (SELECT chunk, sum(tf) AS tokens, "
                "min(dl) AS lo, max(dl) AS hi FROM postings GROUP BY chunk) p ON p.chunk = "
                "c.rowid WHERE coalesce(p.tokens, 0) <> c.tokens OR p.lo <> c.tokens "
                "OR p.hi <> c.tokens"
            ).fetchone()
            if bad_postings:
                problems.append(f"postings: {bad_postings} chunks whose postings disagree "
                                "with their length")  # fmt: skip
            n, tokens = self.conn.execute(
                "SELECT count(*), coalesce(sum(tokens), 0) FROM chunks"
            ).fetchone()
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            if (int(meta["chunks"]), int(meta["tokens"])) != (n, tokens):
                problems.append(f"totals: meta says {meta['chunks']} chunks and {meta['tokens']} "
                                f"tokens, the table has {n} and {tokens}")  # fmt: skip
            (sizes,) = self.conn.execute(
                "SELECT count(*) FROM chunks WHERE vector_dims(embedding) <> dim"
            ).fetchone()
            if sizes:
                problems.append(f"{sizes} chunks whose vector size is not their recorded dim")
            (orphans,) = self.conn.execute(
                "SELECT count(*) FROM chunks c LEFT JOIN documents d ON d.id = c.doc_id "
                "WHERE d.id IS NULL"
            ).fetchone()
            if orphans:
                problems.append(f"{orphans} chunks without a document")
        return problems
