"""The RAG store and exactly-once ingestion with the real embedder, on both backends: real
SQLite files and a real PostgreSQL server with pgvector (the `pg_url` fixture). Every test
that takes `stores` runs once per backend.

The crash test at the end kills real ingesting processes with SIGKILL at random moments
and checks that restarting them leaves the store equal to one clean ingest; two processes
ingesting one folder at once store every document once.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from falconet.errors import RagError
from falconet.rag.chunking import chunk_document
from falconet.rag.embed import default_embedder
from falconet.rag.ingest import ingest, sync
from falconet.rag.loaders import file_sha256, load_document
from falconet.rag.retrieve import RRF_K, reciprocal_rank_fusion, search
from falconet.rag.store import DocMeta, DocumentStore
from falconet.rag.store_sqlite import SQLiteStore, fts_query
from falconet.rag.stores import open_store
from tests.crash_tools import CRASH_ENV, Zygote, run_with_kills
from tests.pg_tools import new_schema, schema_url

WORDS = ["falcon", "river", "harbor", "lantern", "granite", "meadow", "orchard", "copper",
         "winter", "signal", "ledger", "quartz", "willow", "beacon", "canyon", "thistle",
         "marble", "compass", "saddle", "ember", "glacier", "prairie", "anchor", "violet",
         "summit", "tundra", "cedar", "basalt", "heron", "juniper", "lagoon", "mosaic"]  # fmt: skip


class CountingEmbedder:
    """The real embedder, with its calls counted."""

    def __init__(self, inner, id: str | None = None, rotation: np.ndarray | None = None):
        self.inner = inner
        self.id = id or inner.id
        self.dim = inner.dim
        self.rotation = rotation  # a different "model": the real vectors, rotated
        self.calls = 0
        self.texts = 0

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        vectors = self.inner.embed(texts)
        if self.rotation is not None:
            vectors = (vectors @ self.rotation).astype(np.float32)
        return vectors


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture
def counting(embedder):
    return CountingEmbedder(embedder)


class Stores:
    """Stores of one backend, by name: a folder under tmp_path, or a schema of its own in
    the test PostgreSQL database."""

    def __init__(self, kind: str, tmp_path: Path, pg_url: str | None = None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.pg_url = pg_url
        self.prefix = new_schema()

    def spec(self, name: str) -> str:
        if self.kind == "sqlite":
            return str(self.tmp_path / name)
        return schema_url(self.pg_url, f"{self.prefix}_{name}")

    def open(self, name: str, create: bool = True):
        return open_store(self.spec(name), create=create)


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, tmp_path) -> Stores:
    if request.param == "sqlite":
        return Stores("sqlite", tmp_path)
    return Stores("postgres", tmp_path, request.getfixturevalue("pg_url"))


def write_corpus(
    folder: Path, n: int, seed: int = 0, paragraphs: int = 4, big_every: int = 1
) -> list[Path]:
    """n deterministic .md/.txt files, each with words of its own ("token<i>x<p>"): every
    `big_every`-th has `paragraphs` paragraphs of 60-110 words (~1 chunk each), the rest one."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        parts = [f"# Notes {i}"] if i % 2 == 0 else []
        for p in range(paragraphs if i % big_every == 0 else 1):
            words = [rng.choice(WORDS) for _ in range(rng.randint(60, 110))]
            words.insert(rng.randrange(len(words)), f"token{i}x{p}")
            parts.append(" ".join(words).capitalize() + ".")
        path = folder / f"doc{i:03d}.{'md' if i % 2 == 0 else 'txt'}"
        path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        files.append(path)
    return files


def store_rows(store: DocumentStore) -> dict:
    """Everything two stores must agree on (not versions, timestamps or rowids)."""
    if not isinstance(store, SQLiteStore):
        return pg_rows(store)
    db = store._db
    return {
        "documents": db.execute("SELECT id, source, sha256 FROM documents ORDER BY id").fetchall(),
        "chunks": db.execute(
            'SELECT id, doc_id, ord, text, start, "end", section, page FROM chunks ORDER BY id'
        ).fetchall(),
        "embeddings": db.execute(
            "SELECT chunk_id, vector FROM embeddings ORDER BY chunk_id"
        ).fetchall(),
        "fts": store.fts_terms(),
        "fts_rows": db.execute(
            "SELECT c.id, f.text FROM chunks_fts f JOIN chunks c ON c.rowid = f.rowid ORDER BY c.id"
        ).fetchall(),
    }


def pg_rows(store) -> dict:
    """store_rows of a PostgresStore: the same rows, vectors as the same float32 bytes."""
    db = store.conn
    return {
        "documents": db.execute(
            'SELECT id, source, sha256 FROM documents ORDER BY id COLLATE "C"'
        ).fetchall(),
        "chunks": db.execute(
            'SELECT id, doc_id, ord, text, start, "end", section, page FROM chunks '
            'ORDER BY id COLLATE "C"'
        ).fetchall(),
        "embeddings": [
            (cid, np.asarray(v.to_numpy(), dtype="<f4").tobytes())
            for cid, v in db.execute('SELECT id, embedding FROM chunks ORDER BY id COLLATE "C"')
        ],
        "fts": store.fts_terms(),
        "fts_rows": db.execute('SELECT id, text FROM chunks ORDER BY id COLLATE "C"').fetchall(),
    }


def chunk_count(store: DocumentStore) -> int:
    return sum(d.chunks for d in store.documents())


def assert_same_content(a: DocumentStore, b: DocumentStore) -> None:
    ra, rb = store_rows(a), store_rows(b)
    for key in ra:
        assert ra[key] == rb[key], key
    assert a.checksum(versions=False) == b.checksum(versions=False)
    for s in (a, b):
        assert s.integrity_check() == []
        ids = [c[0] for c in store_rows(s)["chunks"]]
        assert len(ids) == len(set(ids)) == chunk_count(s)
        if isinstance(s, SQLiteStore):
            assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            (n_fts,) = s._db.execute("SELECT count(*) FROM chunks_fts").fetchone()
            assert n_fts == len(ids)


# -- the store ---------------------------------------------------------------------------


def test_new_store_is_wal_with_full_sync_and_the_interface(tmp_path):
    with open_store(tmp_path / "s") as store:
        assert isinstance(store, DocumentStore)
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert store.documents() == [] and store.embedder_id is None
    assert (tmp_path / "s" / "store.sqlite3").is_file()


def test_upsert_is_all_or_nothing(stores, tmp_path, counting):
    (tmp_path / "c").mkdir()
    doc_path = tmp_path / "c" / "a.md"
    doc_path.write_text("# Birds\n\nThe peregrine falcon dives faster than any animal.\n")
    with stores.open("s") as store:
        ingest(store, [doc_path], counting)
        before, changes = store.checksum(), store.total_changes
        (doc,) = store.documents()
        doc_path.write_text("# Fish\n\nThe sailfish swims in warm oceans.\n" * 3)
        loaded = load_document(doc_path)
        chunks = chunk_document(loaded, counting.count_tokens)
        st = doc_path.stat()
        meta = DocMeta(
            loaded.source, file_sha256(doc_path), st.st_size, st.st_mtime_ns, counting.id
        )
        bad = np.ones((len(chunks), counting.dim + 1), dtype=np.float32)  # fails mid-transaction
        with pytest.raises(RagError, match="dimensions"):
            store.upsert_document(meta, chunks, bad)
        assert store.checksum() == before
        assert store.integrity_check() == []
        assert store.search_bm25("sailfish", 5) == []
        assert [h.doc_id for h in store.search_bm25("peregrine", 5)] == [doc.id]
        assert store.total_changes > changes  # rows were written, then rolled back

        store.upsert_document(meta, chunks, counting.embed([c.text for c in chunks]))
        (new,) = store.documents()
        assert (new.id, new.version, new.sha256) == (doc.id, 2, meta.sha256)
        assert store.search_bm25("peregrine", 5) == []
        assert {h.doc_id for h in store.search_bm25("sailfish", 5)} == {doc.id}
        assert store.integrity_check() == []


def test_reingest_of_an_unchanged_corpus_writes_and_embeds_nothing(stores, tmp_path, counting):
    corpus = tmp_path / "c"
    files = write_corpus(corpus, 6)
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 8)
    with stores.open("s") as store:
        first = ingest(store, [corpus], counting)
        assert len(first.added) == 6 and first.chunks_written > 6
        assert [p for p, _ in first.skipped] == [str((corpus / "binary.txt").resolve())]
        assert counting.calls == 6  # one batch per document
        rows = chunk_count(store)
        before, changes, calls = store.checksum(), store.total_changes, counting.calls

        again = ingest(store, [corpus], counting)
        assert len(again.unchanged) == 6 and not (again.added or again.updated)
        # touched, not changed: the hash is read, nothing is written or embedded
        os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))
        touched = sync(store, corpus, counting)
        assert len(touched.unchanged) == 6 and touched.chunks_written == 0
        assert counting.calls == calls
        assert store.total_changes == changes
        assert store.checksum() == before
        assert chunk_count(store) == rows


def test_sync_adds_updates_and_removes(stores, tmp_path, counting):
    corpus = tmp_path / "c"
    files = write_corpus(corpus, 5)
    with stores.open("s") as store:
        sync(store, corpus, counting)
        files[1].write_text("A new text about zeppelins and airships.\n")
        files[2].unlink()
        (corpus / "sub").mkdir()
        (corpus / "sub" / "new.md").write_text("# Added\n\nThe kestrel hovers over fields.\n")
        elsewhere = write_corpus(tmp_path / "other", 1, seed=5)  # not under the folder: kept
        ingest(store, elsewhere, counting)
        report = sync(store, corpus, counting)
        assert report.updated == [str(files[1].resolve())]
        assert report.removed == [str(files[2].resolve())]
        assert report.added == [str((corpus / "sub" / "new.md").resolve())]
        assert len(report.unchanged) == 3
        assert store.document(str(files[1])).version == 2
        assert store.document(str(files[2])) is None
        assert store.document(str(elsewhere[0])) is not None
        assert store.search_bm25("token2x0", 5) == []  # the deleted file's own word
        assert store.search_bm25("zeppelins", 1)[0].source == str(files[1].resolve())
        assert store.integrity_check() == []

        # FTS and every table now equal a clean ingest of the same files
        with stores.open("clean") as clean:
            ingest(clean, [*sorted(corpus.rglob("*.*")), *elsewhere], counting)
            assert_same_content(store, clean)

        files[3].write_bytes(b"\x00\x01 now a binary file")  # cannot be indexed any more
        report = sync(store, corpus, counting)
        assert report.removed == [str(files[3].resolve())]
        assert [p for p, _ in report.skipped] == [str(files[3].resolve())]
        assert store.document(str(files[3])) is None and store.search_bm25("token3x0", 5) == []

        removed = store.remove_document(str(files[0]))
        assert removed.source == str(files[0].resolve())
        assert all(h.doc_id != removed.id for h in store.search_bm25("token0x1", 5))
        with pytest.raises(RagError, match="no document"):
            store.remove_document(str(files[0]))
        assert store.integrity_check() == []


def test_hostile_queries_do_not_raise(stores, tmp_path, counting):
    corpus = tmp_path / "c"
    write_corpus(corpus, 2)
    with stores.open("s") as store:
        ingest(store, [corpus], counting)
        hostile = ['"', '""', 'NEAR(', "NEAR(falcon river, 2)", "*", "-", "falcon*", "-falcon",
                   "falcon AND", "OR", "NOT", "text:falcon", "^falcon", "(falcon", "falcon)",
                   "'; DROP TABLE chunks; --", "{text}: x", "", "   ", "\x00", "é\u200b😀",
                   "a" * 5000, 'river" OR "falcon']  # fmt: skip
        for q in hostile:
            assert isinstance(store.search_bm25(q, 5), list)
        assert fts_query("NEAR( falcon*") == '"near" OR "falcon"'
        assert store.search_bm25('falcon" OR "river', 3)
        assert store.integrity_check() == []


def test_vector_search_is_exact_and_cached(stores, tmp_path, counting):
    corpus = tmp_path / "c"
    write_corpus(corpus, 3)
    with stores.open("s") as store:
        ingest(store, [corpus], counting)
        (cid, text), *_ = store.chunk_texts(store.documents()[1].id)
        vector = counting.embed([text])[0]
        hits = store.search_vector(vector, 3)
        assert hits[0].chunk_id == cid and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].score >= hits[1].score >= hits[2].score
        if stores.kind == "postgres":  # the HNSW index finds the same chunks, same scores
            ann = store.search_vector(vector, 3, ann=True)
            assert [(h.chunk_id, h.score) for h in ann] == [(h.chunk_id, h.score) for h in hits]
            store.remove_document(store.documents()[1].id)
            assert all(h.chunk_id != cid for h in store.search_vector(vector, 10, ann=True))
            assert all(h.chunk_id != cid for h in store.search_vector(vector, 10))
            return
        cached = store._matrix
        store.search_vector(vector, 3)
        assert store._matrix is cached  # no reread without a write
        store.remove_document(store.documents()[1].id)
        assert all(h.chunk_id != cid for h in store.search_vector(vector, 10))
        assert store._matrix is not cached


def test_reciprocal_rank_fusion_and_hybrid_search(stores, tmp_path, counting):
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]])
    assert [key for key, _ in fused] == ["a", "c", "b"]
    assert fused[0][1] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert reciprocal_rank_fusion([["x", "y"], ["y", "x"]])[0][0] == "x"  # a tie: by id
    corpus = tmp_path / "c"
    write_corpus(corpus, 6)
    with stores.open("s") as store:
        assert search(store, "token3x1", 3, "hybrid", counting) == []  # an empty store
        ingest(store, [corpus], counting)
        hits = search(store, "token3x1 falcon", 3, "hybrid", counting)
        bm25 = store.search_bm25("token3x1 falcon", 12)
        assert len(hits) == 3 and hits[0].chunk_id == bm25[0].chunk_id
        assert "token3x1" in hits[0].text
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert search(store, "token3x1", 2, "bm25") == store.search_bm25("token3x1", 2)
        other = CountingEmbedder(counting.inner, id="another-model")
        with pytest.raises(RagError, match="re-embed"):
            search(store, "falcon", 3, "vector", other)
        with pytest.raises(RagError, match="unknown search mode"):
            search(store, "falcon", 3, "magic", counting)


def test_corrupt_or_foreign_file_is_a_rag_error(tmp_path):
    garbage = tmp_path / "g" / "store.sqlite3"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RagError, match="not a readable RAG store"):
        open_store(garbage.parent)
    foreign = tmp_path / "f" / "store.sqlite3"
    foreign.parent.mkdir()
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(RagError, match="not a falconet RAG store"):
        open_store(foreign.parent)
    with pytest.raises(RagError, match="no RAG store"):
        open_store(tmp_path / "missing", create=False)
    # a store whose header was overwritten
    good = tmp_path / "s"
    open_store(good).close()
    data = bytearray((good / "store.sqlite3").read_bytes())
    data[:16] = b"garbage garbage!"
    (good / "store.sqlite3").write_bytes(bytes(data))
    with pytest.raises(RagError):
        open_store(good)


def test_an_embedder_change_reembeds_and_resumes_after_a_crash(stores, tmp_path, embedder):
    corpus = tmp_path / "c"
    write_corpus(corpus, 4)
    old = CountingEmbedder(embedder)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(embedder.dim,) * 2))[0]
    new = CountingEmbedder(embedder, id="rotated-minilm", rotation=rotation.astype(np.float32))
    with stores.open("s") as store:
        ingest(store, [corpus], old)
        assert store.embedder_id == embedder.id

        class Interrupted(Exception):
            pass

        class Dying(CountingEmbedder):
            def embed(self, texts):
                if self.calls == 2:
                    raise Interrupted
                return super().embed(texts)

        dying = Dying(embedder, id=new.id, rotation=new.rotation)
        with pytest.raises(Interrupted):
            ingest(store, [corpus], dying)
        assert store.embedder_id == embedder.id  # not recorded until all are done
        assert sorted(d.embedder for d in store.documents()) == sorted([embedder.id, new.id] * 2)

        report = ingest(store, [corpus], new)
        assert new.calls == 2 and len(report.reembedded) == 2 and len(report.unchanged) == 4
        assert store.embedder_id == new.id
        assert {d.embedder for d in store.documents()} == {new.id}
        with stores.open("clean") as clean:
            ingest(clean, [corpus], new)
            rows, clean_rows = store_rows(store), store_rows(clean)
            assert rows["chunks"] == clean_rows["chunks"]
            for (a, va), (b, vb) in zip(rows["embeddings"], clean_rows["embeddings"], strict=True):
                assert a == b
                np.testing.assert_allclose(
                    np.frombuffer(va, np.float32), np.frombuffer(vb, np.float32), atol=1e-6
                )
        calls = new.calls
        ingest(store, [corpus], new)
        assert new.calls == calls  # nothing left to re-embed

        # vectors computed for chunks that another process has since replaced: refused
        doc = store.documents()[0]
        before = store.checksum()
        ids = [cid for cid, _ in store.chunk_texts(doc.id)]
        stale = np.ones((len(ids), embedder.dim), dtype=np.float32)
        with pytest.raises(RagError, match="changed while"):
            store.replace_embeddings(doc.id, "x", [*ids[:-1], "0" * 64], stale)
        assert store.checksum() == before


# A process that SIGKILL finds inside upsert_document's transaction: the 4th chunk's text
# is read after the old rows were deleted and the first new ones written.
IN_TRANSACTION = r"""
import sys, time
import numpy as np
from falconet.rag.store import DocMeta
from falconet.rag.stores import open_store

class Chunk:
    def __init__(self, i):
        self.i, self.start, self.end, self.section, self.page = i, 10 * i, 10 * i + 9, None, None

    @property
    def text(self):
        if self.i == 3:
            print("inside", flush=True)
            time.sleep(60)
        return f"zebra crossing number {self.i}"

store = open_store(sys.argv[1])
meta = DocMeta(sys.argv[2], "b" * 64, 1, 1, store.embedder_id)
store.upsert_document(meta, [Chunk(i) for i in range(6)], np.ones((6, store.dim), np.float32))
"""


def test_sigkill_inside_the_transaction_leaves_the_old_version(stores, tmp_path, counting):
    corpus = tmp_path / "c"
    files = write_corpus(corpus, 2)
    with stores.open("s") as store:
        ingest(store, [corpus], counting)
        before = store.checksum()
    child = subprocess.Popen(
        [sys.executable, "-c", IN_TRANSACTION, stores.spec("s"), str(files[0].resolve())],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == "inside\n"
        if stores.kind == "sqlite":
            assert (tmp_path / "s" / "store.sqlite3-wal").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with stores.open("s") as store:
        assert store.checksum() == before
        assert store.search_bm25("zebra", 5) == []
        assert store.integrity_check() == []
        if stores.kind == "sqlite":
            assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(ingest(store, [corpus], counting).unchanged) == 2


# -- the crash test ------------------------------------------------------------------------


def committed(stores: Stores, name: str, sql: str) -> int:
    """A count read from the store over a read-only connection (no checkpoint, no
    recovery written: the restarted process is the one that finds the crashed state)."""
    if stores.kind == "postgres":
        import psycopg

        with psycopg.connect(stores.pg_url, autocommit=True) as db:
            db.execute(f"SET search_path TO {stores.prefix}_{name}")
            if db.execute("SELECT to_regclass('documents')").fetchone()[0] is None:
                return 0
            return db.execute(sql).fetchone()[0] or 0
    path = stores.tmp_path / name / "store.sqlite3"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0] or 0
    except sqlite3.OperationalError:  # killed before the schema was committed
        return 0
    finally:
        db.close()


UPDATED = "coalesce(sum(CASE WHEN version > 1 THEN 1 ELSE 0 END), 0)"  # SQLite and PostgreSQL


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "falconet", *args], capture_output=True,
                         text=True, cwd=cwd, timeout=300, env=CRASH_ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def test_sigkill_at_random_moments_then_restart_equals_a_clean_ingest(stores, tmp_path):
    corpus = tmp_path / "corpus"
    # Small files (~120 tokens; every 20th ~500): embedding is the cost, ~20 chunks/s here.
    files = write_corpus(corpus, 200, seed=1, big_every=20)
    rng = random.Random(6)
    log = tmp_path / "run.log"
    zygote = Zygote(tmp_path, preload=("torch", "sentence_transformers", "tqdm"))
    try:
        # Phase 1: ingest, killed 20 times, then finished by the real command.
        argv = ["rag", "ingest", str(corpus), "--store", stores.spec("crashed")]
        docs = lambda: committed(stores, "crashed", "SELECT count(*) FROM documents")  # noqa: E731
        killed, finished, _ = run_with_kills(zygote, argv, log, rng, 20, "ingest:", docs, 200)
        assert killed == 20
        done = docs()
        assert 0 < done < 200 or finished, "no kill landed during the ingest"
        res = cli(*argv, cwd=tmp_path)
        assert f"{200 - done} added" in res.stdout, res.stdout
        pid = zygote.start(["rag", "ingest", str(corpus), "--store", stores.spec("clean")], log)
        assert zygote.wait(pid) == 0, log.read_text()
        with stores.open("crashed") as a, stores.open("clean") as b:
            assert len(a.documents()) == 200
            assert_same_content(a, b)

        # Phase 2: edit 20 files, delete 10, sync, killed 20 times, then finished.
        order = rng.sample(files, 30)
        for i, path in enumerate(order[:20]):
            path.write_text(path.read_text() + f"\nAn edit, number {i}: beacon ledger.\n" * 8)
        for path in order[20:]:
            path.unlink()
        argv = ["rag", "sync", str(corpus), "--store", stores.spec("crashed")]
        changed = lambda: committed(  # noqa: E731
            stores, "crashed", f"SELECT 200 - count(*) + {UPDATED} FROM documents"
        )
        killed, finished, _ = run_with_kills(zygote, argv, log, rng, 20, "sync:", changed, 30)
        assert killed == 20
        done = committed(stores, "crashed", f"SELECT {UPDATED} FROM documents")
        assert 0 < done < 20 or finished, "no kill landed during the sync"
        res = cli(*argv, cwd=tmp_path)
        assert f"{20 - done} updated" in res.stdout, res.stdout
        pid = zygote.start(["rag", "ingest", str(corpus), "--store", stores.spec("clean2")], log)
        assert zygote.wait(pid) == 0, log.read_text()
        with stores.open("crashed") as a, stores.open("clean2") as b:
            assert len(a.documents()) == 190
            assert_same_content(a, b)
            versions = {d.source: d.version for d in a.documents()}
            assert all(versions[str(p.resolve())] >= 2 for p in order[:20])
    finally:
        zygote.close()


def test_bm25_searches_the_rarer_words(stores, tmp_path, monkeypatch):
    """Words in more than half of the chunks are left out of the FTS5 query (their IDF is
    ~0) unless nothing else is left; the rest are taken rarest first within a budget of
    matched chunks (BM25_MAX_POSTINGS); document frequencies follow every write."""
    from falconet.rag import store as store_module
    from falconet.rag.chunking import Chunk

    def put(store, name, texts):
        chunks, offset = [], 0
        for text in texts:
            chunks.append(Chunk(text, offset, offset + len(text), None, None))
            offset += len(text) + 1
        meta = DocMeta(source=f"/t/{name}", sha256=name, size=offset, mtime_ns=0, embedder="e")
        vectors = np.ones((len(texts), 4), dtype=np.float32)
        return store.upsert_document(meta, chunks, vectors)

    texts = [f"the {'river ' if i % 3 else ''}of chunk{i}" for i in range(60)]
    texts[7] += " heron"
    texts[8] += " heron otter"
    texts[9] += " café"
    with stores.open("s") as store:
        put(store, "a", texts)
        assert store.bm25_terms("The river, of the heron? OTTER") == ["otter", "heron"]
        assert store.bm25_terms("the river of") == ["river"]  # only common words: the rarest
        hits = store.search_bm25("of the river the", 5)
        assert len(hits) == 5 and all("river" in h.text for h in hits)
        # The rare words decide the ranking; the common ones are not searched for.
        assert [h.ord for h in store.search_bm25("the river heron of otter", 5)] == [8, 7]
        assert store.bm25_terms("Café the") == ["café"]  # the index folds diacritics
        assert [h.ord for h in store.search_bm25("the CAFE", 3)] == [9]
        # Words the index lacks go last; a pasted page of them still finds the heron.
        many = " ".join(f"w{i}" for i in range(2000))
        assert store.bm25_terms(f"{many} heron")[:2] == ["heron", "w0"]
        assert [h.ord for h in store.search_bm25(f"{many} heron the", 5)] == [7, 8]
        monkeypatch.setattr(store_module, "BM25_MAX_POSTINGS", 2)
        assert store.bm25_terms("heron otter chunk5") == ["otter", "chunk5"]
        monkeypatch.setattr(store_module, "BM25_MAX_TERMS", 1)
        assert store.bm25_terms("heron otter chunk5") == ["otter"]
        monkeypatch.undo()
        # A write moves the generation: the cached frequencies are read again.
        put(store, "b", [f"otter {i}" for i in range(100)])
        assert store.bm25_terms("heron otter") == ["heron"]  # otter: 101 of 160 chunks
        assert store.search_bm25("otter of", 3)
        assert store.integrity_check() == []


def test_two_processes_ingesting_one_folder_store_each_document_once(stores, tmp_path):
    """Two `falconet rag ingest` processes at once, one walking the files forwards and one
    backwards, so that they meet in the middle: each document is stored once, at
    version 1, and the store equals one clean ingest."""
    corpus = tmp_path / "corpus"
    files = write_corpus(corpus, 24, seed=3, big_every=6)
    command = [sys.executable, "-m", "falconet", "rag", "ingest", "--store", stores.spec("shared")]
    procs = [
        subprocess.Popen([*command, *map(str, order)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=CRASH_ENV)
        for order in (files, files[::-1])
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        added, unchanged = map(
            int, re.search(r"(\d+) added, 0 updated, (\d+) unchanged", out).groups()
        )
        assert added + unchanged == 24, out  # what the other stored first is unchanged
    cli("rag", "ingest", str(corpus), "--store", stores.spec("clean"), cwd=tmp_path)
    with stores.open("shared") as a, stores.open("clean") as b:
        assert len(a.documents()) == 24 and {d.version for d in a.documents()} == {1}
        assert_same_content(a, b)
        assert a.checksum() == b.checksum()  # versions too: no document was written twice
