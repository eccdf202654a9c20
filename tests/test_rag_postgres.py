"""What only the PostgreSQL store has (test_rag_store.py runs the shared store suite on both
backends): its migrations and indexes; what it refuses (malformed URLs, a server that does
not answer, hostile schema names, a schema that is not a store, a newer store), as typed
errors and one-line CLI messages; the same rows and rankings as SQLite for the same files;
and two `falconet serve` replicas ingesting and querying one store at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import psycopg
import pytest
from pgvector import Vector

from falconet.errors import RagError, StoreUnavailableError
from falconet.rag.chunking import Chunk
from falconet.rag.embed import default_embedder
from falconet.rag.ingest import ingest
from falconet.rag.postgres_schema import MIGRATIONS, fts_tokens
from falconet.rag.retrieve import MODES, search
from falconet.rag.store import DocMeta
from falconet.rag.store_postgres import nearest_sql
from falconet.rag.stores import open_store
from tests.conftest import assert_cli_error
from tests.pg_tools import new_schema, schema_url
from tests.server_tools import ServerProcess
from tests.test_rag_store import store_rows, write_corpus

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
T = 300
# Text that FTS5's tokenizer cuts in its own ways: diacritics, symbols, underscores,
# numbers, ligatures, apostrophes; PostgreSQL's terms must come out the same.
TRICKY = ("Café naïve façade: x²y a_b C-3PO 3.14 İstanbul ﬁne LORD's ½ ǅ 😀z tab\tsep "
          "e\u0301t\u00e9 ZWSP\u200bjoin ÆON straße Ωmega ٣٤ 東京タワー\n")  # fmt: skip


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falconet", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=T, env={**os.environ, **ENV})  # fmt: skip


def test_migrations_are_recorded_applied_once_and_never_downgraded(pg_url):
    schema = new_schema()
    url = schema_url(pg_url, schema)
    with pytest.raises(RagError, match="no RAG store in schema"):
        open_store(url, create=False)
    with open_store(url) as store:
        assert store.documents() == [] and store.embedder_id is None
        applied = store.conn.execute("SELECT version FROM migrations ORDER BY version").fetchall()
        assert [v for (v,) in applied] == [number for number, _, _ in MIGRATIONS]
        meta = DocMeta("/t/a.txt", "a" * 64, 11, 0, "e")
        store.upsert_document(meta, [Chunk("hello world", 0, 11, None, None)],
                              np.ones((1, 4), np.float32))  # fmt: skip
        (index,) = store.conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = "
            "'chunks_embedding_hnsw_4'",
            (schema,),
        ).fetchone()
        assert "USING hnsw" in index and "vector_cosine_ops" in index and "dim = 4" in index
        assert (store.embedder_id, store.dim) == ("e", 4)
        # The ANN query is one the index answers (checked on the plan: one row is too few
        # for the planner to choose the index by cost, so sequential scans are off).
        q = Vector(np.ones(4, np.float32))
        with store.conn.transaction():
            store.conn.execute("SET LOCAL enable_seqscan = off")
            plan = store.conn.execute(
                "EXPLAIN " + nearest_sql(4, hnsw=True), (q, q, 5)
            ).fetchall()  # fmt: skip
            assert "Index Scan using chunks_embedding_hnsw_4" in plan[1][0], plan
            exact = store.conn.execute(
                "EXPLAIN " + nearest_sql(4, hnsw=False), (q, q, 5)
            ).fetchall()  # fmt: skip
            assert not any("hnsw" in row[0] for row in exact), exact
    with open_store(url, create=False) as again:  # found at the latest version: nothing done
        assert again.conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(
            MIGRATIONS
        )
        assert [d.source for d in again.documents()] == ["/t/a.txt"]
        again.conn.execute("INSERT INTO migrations (version, description) VALUES (99, 'later')")
    with pytest.raises(RagError, match="store schema 99.*use a newer falconet"):
        open_store(url)


def test_a_dropped_connection_fails_one_call_and_is_reopened(pg_url):
    """A server restart or an administrator's kill: the call that finds the connection
    gone is a RagError, the next one reconnects."""
    with open_store(schema_url(pg_url, new_schema())) as store:
        meta = DocMeta("/t/b.txt", "b" * 64, 5, 0, "e")
        store.upsert_document(meta, [Chunk("heron", 0, 5, None, None)], np.ones((1, 4), np.float32))
        pid = store.conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreUnavailableError, match="the RAG store at postgresql://"):
            store.documents()
        assert [d.source for d in store.documents()] == ["/t/b.txt"]
        assert store.conn.info.backend_pid != pid
        assert [h.text for h in store.search_bm25("heron", 3)] == ["heron"]


def test_a_schema_that_is_not_a_store_is_refused_and_left_alone(pg_url):
    foreign = new_schema()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {foreign}")
        db.execute(f"CREATE TABLE {foreign}.accounts (id integer)")
        db.execute(f"INSERT INTO {foreign}.accounts VALUES (7)")
        with pytest.raises(RagError, match="not a falconet RAG store"):
            open_store(schema_url(pg_url, foreign))
        tables = db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (foreign,)
        ).fetchall()
        assert tables == [("accounts",)]
        assert db.execute(f"SELECT id FROM {foreign}.accounts").fetchall() == [(7,)]


@pytest.mark.parametrize(
    "name",
    ['x"; DROP SCHEMA public CASCADE; --', "public; drop", "Upper", "pg_catalog", "pg_temp",
     "1abc", "", "a" * 64, "info-schema", "x y", "café", "x\x00y", "../up"],
)  # fmt: skip
def test_hostile_schema_names_are_refused(pg_url, tmp_path, name):
    with pytest.raises(RagError, match="cannot name a store collection"):
        open_store(schema_url(pg_url, quote(name)))
    with pytest.raises(RagError, match="cannot name a store collection"):
        open_store(pg_url, collection=name)
    with pytest.raises(RagError, match="cannot name a store collection"):
        open_store(tmp_path / "s", collection=name)
    assert not (tmp_path / "s").exists()
    with psycopg.connect(pg_url, autocommit=True) as db:  # nothing was created or dropped
        assert db.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'public'").fetchone()


def test_bad_urls_and_an_unreachable_server_are_clear_errors(pg_url, tmp_path):
    with socket_closed_port() as port:
        cases = [
            (f"postgresql://me:hunter2@127.0.0.1:{port}/db", "cannot connect to the RAG store "
             f"at postgresql://me@127.0.0.1:{port}/db"),
            ("postgresql://127.0.0.1:notaport/db", "cannot connect to the RAG store at "
             'postgresql://127.0.0.1:notaport/db: connection is bad: invalid integer value '
             '"notaport" for connection option "port"'),
            ("postgresql://127.0.0.1/db?sslmode=sometimes", "cannot connect to the RAG store "
             'at postgresql://127.0.0.1/db: connection is bad: invalid sslmode value: '
             '"sometimes"'),
            ("postgresql://127.0.0.1/db?colour=blue", "not a usable PostgreSQL URL (invalid "
             'URI query parameter: "colour")'),
            ("mysql://127.0.0.1/db", "mysql:// is not a store URL"),
        ]  # fmt: skip
        for url, message in cases:
            with pytest.raises(RagError, match="^" + re.escape(message)) as e:
                open_store(url)
            assert "hunter2" not in str(e.value)
        res = run_cli("rag", "list", "--store", cases[0][0], cwd=tmp_path)
        assert_cli_error(res, cases[0][1])
        assert "hunter2" not in res.stderr and "Traceback" not in res.stderr
        res = run_cli("rag", "search", "x", "--store", cases[1][0], cwd=tmp_path)
        assert_cli_error(res, cases[1][1])
        res = run_cli("serve", "--port", "0", "--rag-store", cases[0][0], cwd=tmp_path)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert "--rag-store: cannot connect to the RAG store" in res.stderr
        assert "hunter2" not in res.stderr
    # the store that exists but has no documents yet, through the CLI
    url = schema_url(pg_url, new_schema())
    assert_cli_error(run_cli("rag", "list", "--store", url, cwd=tmp_path), "no RAG store")


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, never listened, while in use)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_postgres_holds_what_sqlite_holds(pg_url, tmp_path):
    """The same files give the same documents, chunks, vectors (to the bit), terms and
    term counts on both backends, and the same hits in every search mode."""
    corpus = tmp_path / "c"
    write_corpus(corpus, 8, seed=2)
    (corpus / "tricky.txt").write_text(TRICKY, encoding="utf-8")
    embedder = default_embedder()
    with open_store(tmp_path / "s") as a, open_store(schema_url(pg_url, new_schema())) as b:
        for store in (a, b):
            assert not ingest(store, [corpus], embedder).skipped
        assert store_rows(a) == store_rows(b)
        assert {"cafe", "naive", "x²y", "a", "b", "3", "14", "istanbul", "ﬁne", "ǆ", "z",
                "join", "zwsp", "ete", "東京タワー"} <= {t for t, _, _ in b.fts_terms()}  # fmt: skip
        for query in ("token3x1 falcon", "Café naive", "İSTANBUL x²y", "river harbor lantern",
                      "the of and", "😀", ""):  # fmt: skip
            for mode in MODES:
                if not query and mode != "bm25":
                    continue
                ha, hb = (search(s, query, 5, mode, embedder) for s in (a, b))
                assert [h.chunk_id for h in ha] == [h.chunk_id for h in hb], (query, mode)
                np.testing.assert_allclose([h.score for h in hb], [h.score for h in ha],
                                           rtol=1e-5)  # fmt: skip
        # A word the tokenizer cuts in two is FTS5's phrase "a b" but PostgreSQL's words a
        # and b (scored as two): the same chunk, another score.
        assert [h.chunk_id for h in a.search_bm25("a_b", 5)] == [
            h.chunk_id for h in b.search_bm25("a_b", 5)
        ]
    assert fts_tokens("Naïve_ÉTÉ x²y") == ["naive", "ete", "x²y"]


def test_two_servers_share_one_store(pg_url, tmp_path):
    """Two `falconet serve` replicas on one PostgreSQL store: both ingest the same folder
    at once while each takes an upload; no document is stored twice, both list the same
    documents, and a document ingested through one is found through the other at once."""
    url = schema_url(pg_url, new_schema())
    root = tmp_path / "root"
    write_corpus(root, 6, seed=4)
    servers = [
        ServerProcess("--rag-store", url, "--rag-root", str(root),
                      "--rag-uploads", str(tmp_path / f"uploads{i}"), env=ENV)
        for i in range(2)
    ]  # fmt: skip
    try:
        for s in servers:
            s.wait_ready()
        texts = {"cain.txt": "And Cain rose up against Abel his brother, and slew him.\n",
                 "ark.md": "# The ark\n\nMake thee an ark of gopher wood; rooms shalt thou "
                           "make in the ark.\n"}  # fmt: skip

        def upload(server, name):
            files = [("file", (name, texts[name].encode(), "text/plain"))]
            return httpx.post(f"{server.url}/v1/rag/documents", files=files, timeout=T)

        def by_path(server):
            return httpx.post(f"{server.url}/v1/rag/documents", json={"path": str(root)},
                              timeout=T)  # fmt: skip

        with ThreadPoolExecutor(4) as pool:
            work = [pool.submit(by_path, s) for s in servers]
            work += [pool.submit(upload, servers[0], "cain.txt"),
                     pool.submit(upload, servers[1], "ark.md")]  # fmt: skip
            for r in (w.result() for w in work):
                assert r.status_code == 200, r.text
        listed = [httpx.get(f"{s.url}/v1/rag/documents", timeout=T).json()["data"] for s in servers]
        assert listed[0] == listed[1]
        assert len({d["id"] for d in listed[0]}) == len({d["source"] for d in listed[0]}) == 8
        assert {d["version"] for d in listed[0]} == {1}

        def found(server, query: str) -> list[str]:
            r = httpx.post(f"{server.url}/v1/rag/query",
                           json={"query": query, "answer": False, "mode": "bm25", "k": 3},
                           timeout=T)  # fmt: skip
            assert r.status_code == 200, r.text
            return [Path(s["source"]).name for s in r.json()["sources"]]

        assert found(servers[1], "Cain Abel")[0] == "cain.txt"  # uploaded to the other
        assert found(servers[0], "gopher wood")[0] == "ark.md"
        texts["psalm.txt"] = "The heavens declare the glory of God; the firmament sheweth.\n"
        assert upload(servers[0], "psalm.txt").status_code == 200
        assert found(servers[1], "firmament heavens")[0] == "psalm.txt"  # at once
        (doc,) = [d for d in listed[0] if d["source"].endswith("cain.txt")]
        assert httpx.delete(f"{servers[1].url}/v1/rag/documents/{doc['id']}",
                            timeout=T).status_code == 200  # fmt: skip
        assert "cain.txt" not in found(servers[0], "Cain Abel")

        # The database drops every falconet connection (a restart, an administrator): a
        # request on a dropped connection is a 503 to retry, and the next on that thread
        # reconnects.
        with psycopg.connect(pg_url, autocommit=True) as admin:
            (killed,) = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'falconet'"
            ).fetchone()
        assert killed >= 2
        statuses = []
        while len(statuses) < 100 and (not statuses or statuses[-1] != 200):
            r = httpx.post(f"{servers[1].url}/v1/rag/query",
                           json={"query": "gopher wood", "answer": False, "mode": "bm25"},
                           timeout=T)  # fmt: skip
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "store_unavailable", r.text
        # (a worker thread that had no connection yet answers 200 at once)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
        with open_store(url, create=False) as store:
            assert store.integrity_check() == []
            assert len(store.documents()) == 8
            ids = [c[0] for c in store_rows(store)["chunks"]]
            assert len(ids) == len(set(ids))
    finally:
        for s in servers:
            s.stop()


def test_each_collection_of_a_postgres_store_is_a_schema_of_its_own(pg_url, tmp_path):
    """Multi-user mode maps a collection to its own store (server/collections.py): on
    PostgreSQL a schema named from the collection's folder, the URL's other parameters
    kept. Documents ingested into one are not in the other's list or search."""
    from falconet.server.collections import collection_store

    root = schema_url(pg_url, new_schema()) + "&connect_timeout=5"
    a_url, b_url = collection_store(root, "legal-1a2b"), collection_store(root, "Legal-1a2b")
    assert a_url != b_url and "connect_timeout=5" in a_url and a_url.count("schema=") == 1
    corpus = tmp_path / "c"
    write_corpus(corpus, 3, seed=4)
    embedder = default_embedder()
    with open_store(a_url) as a, open_store(b_url) as b:
        assert not ingest(a, [corpus], embedder).skipped
        assert len(a.documents()) == 3 and b.documents() == []
        assert search(b, "token3x1 falcon", 5, "hybrid", embedder) == []
    assert (
        collection_store(tmp_path / "s", "legal-1a2b")
        == tmp_path / "s" / "collections" / "legal-1a2b"
    )
