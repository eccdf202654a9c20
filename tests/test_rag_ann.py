"""The optional ANN index (usearch): recall against exact search, and that it is a cache
which records the committed store state it reflects and is rebuilt, never trusted, when
stale or damaged."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("usearch")

from falconet.rag.ann import AnnIndex  # noqa: E402
from falconet.rag.store import DocMeta  # noqa: E402
from falconet.rag.stores import open_store  # noqa: E402

DIM = 384
DOCS = 300
CHUNKS = 10  # 3000 rows
EMBEDDER = "random-unit-384"


@dataclass
class Chunk:
    text: str
    start: int
    end: int
    section: str | None = None
    page: int | None = None


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add_doc(store, name: str, vectors: np.ndarray) -> str:
    meta = DocMeta(source=f"/docs/{name}.txt", sha256=name.ljust(64, "0"), size=1, mtime_ns=0,
                   embedder=EMBEDDER)  # fmt: skip
    chunks = [Chunk(f"{name} chunk {i}", i * 10, i * 10 + 9) for i in range(len(vectors))]
    store.upsert_document(meta, chunks, vectors)
    return meta.source


@pytest.fixture
def filled(tmp_path):
    rng = np.random.default_rng(0)
    store = open_store(tmp_path / "store")
    for d in range(DOCS):
        add_doc(store, f"doc{d:03d}", unit(rng, CHUNKS))
    yield store, rng
    store.close()


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_recall_and_same_hits(filled):
    store, rng = filled
    queries = unit(rng, 50)
    recalls = []
    for q in queries:
        exact = [h.chunk_id for h in store.search_vector(q, 10)]
        approx = [h.chunk_id for h in store.search_vector(q, 10, ann=True)]
        recalls.append(len(set(exact) & set(approx)) / 10)
    recall = float(np.mean(recalls))
    print(f"ANN recall@10 vs exact over {DOCS * CHUNKS} rows, dim {DIM}: {recall:.3f}")
    assert recall >= 0.9
    # A query equal to a stored vector: the same top hit, field for field.
    q = queries[0] * 0.1 + store.vector_snapshot()[3][1234]
    e, a = store.search_vector(q, 1)[0], store.search_vector(q, 1, ann=True)[0]
    assert a.chunk_id == e.chunk_id
    for field in ("chunk_id", "doc_id", "source", "ord", "text", "start", "end", "section",
                  "page"):  # fmt: skip
        assert getattr(a, field) == getattr(e, field)
    assert a.score == pytest.approx(e.score, abs=1e-5)


def test_index_records_state_and_is_rebuilt_after_writes(filled):
    store, rng = filled
    folder = store.path.parent
    index = AnnIndex.load_or_build(store)
    assert index.rebuilt
    info = json.loads(AnnIndex.sidecar_for(store).read_text())
    generation, embedder = store.write_state()
    assert info["generation"] == generation and info["embedder"] == embedder == EMBEDDER
    assert info["rows"] == DOCS * CHUNKS and info["dim"] == DIM
    assert AnnIndex.path_for(store) == folder / "vectors.usearch"
    again = AnnIndex.load_or_build(store)
    assert not again.rebuilt  # up to date: loaded, not rebuilt
    assert leftovers(folder) == []

    # A new document is found, a removed one never returned.
    new = unit(rng, 3)
    source = add_doc(store, "fresh", new)
    assert store.write_state()[0] != generation
    hits = store.search_vector(new[1], 5, ann=True)
    assert store._ann.rebuilt and hits[0].source == source and hits[0].ord == 1
    info = json.loads(AnnIndex.sidecar_for(store).read_text())
    assert info["generation"] == store.write_state()[0] and info["rows"] == DOCS * CHUNKS + 3

    target = store.search_vector(new[0], 1)[0]
    assert target.source == source
    inode = os.stat(AnnIndex.path_for(store)).st_ino
    store.remove_document(source)
    for v in new:
        assert all(h.source != source for h in store.search_vector(v, 20, ann=True))
    assert store._ann.rebuilt
    assert os.stat(AnnIndex.path_for(store)).st_ino != inode  # replaced by a rename
    assert leftovers(folder) == []

    # Another process's write (a second connection) also makes it stale.
    other = open_store(folder)
    try:
        source2 = add_doc(other, "other", new)
    finally:
        other.close()
    assert store.search_vector(new[2], 1, ann=True)[0].source == source2


def test_damaged_or_stale_files_are_rebuilt_not_trusted(filled):
    store, rng = filled
    AnnIndex.load_or_build(store)
    path, sidecar = AnnIndex.path_for(store), AnnIndex.sidecar_for(store)
    good = path.read_bytes()
    q = store.vector_snapshot()[3][777] + 0.1 * unit(rng, 1)[0]  # an unambiguous top hit
    want = store.search_vector(q, 1)[0].chunk_id  # exact

    path.write_bytes(good[: len(good) // 2])  # truncated
    index = AnnIndex.load_or_build(store)
    assert index.rebuilt and path.stat().st_size == len(good)

    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(corrupt))
    assert AnnIndex.load_or_build(store).rebuilt

    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "generation": "999999"}))  # wrong counter
    assert AnnIndex.load_or_build(store).rebuilt
    sidecar.write_text(json.dumps({**info, "embedder": "another-model"}))
    assert AnnIndex.load_or_build(store).rebuilt
    sidecar.write_text("{not json")
    assert AnnIndex.load_or_build(store).rebuilt
    path.unlink()
    assert AnnIndex.load_or_build(store).rebuilt

    store._ann = None
    assert store.search_vector(q, 10, ann=True)[0].chunk_id == want
    assert not store._ann.rebuilt  # the rebuilt file is trusted again
    assert leftovers(store.path.parent) == []


def test_empty_store_and_missing_usearch(tmp_path, monkeypatch):
    import builtins

    from falconet.errors import RagError

    store = open_store(tmp_path / "store")
    try:
        assert store.search_vector(np.ones(DIM, dtype=np.float32), 5, ann=True) == []
        assert store.ann_index().rows == 0
        store._ann = None
        real_import = builtins.__import__

        def no_usearch(name, *args, **kwargs):
            if name.startswith("usearch"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_usearch)
        with pytest.raises(RagError, match=r"pip install falconet\[ann\]"):
            store.search_vector(np.ones(DIM, dtype=np.float32), 5, ann=True)
    finally:
        store.close()


def test_cli_search_with_ann(tmp_path):
    from tests.test_rag_cli import rag, write_docs

    write_docs(tmp_path / "docs")
    assert rag("ingest", "docs", cwd=tmp_path).returncode == 0
    args = ("search", "fastest diving bird", "-k", "2", "--mode", "vector")
    exact, approx = rag(*args, cwd=tmp_path), rag(*args, "--ann", cwd=tmp_path)
    assert approx.returncode == 0, approx.stderr

    # A handful of chunks: the approximate index finds them all (scores to 4 decimals may
    # differ in the last digit: float32 sums in another order).
    def strip(out: str) -> str:
        return re.sub(r"score [0-9.]+", "score", out)

    assert strip(approx.stdout) == strip(exact.stdout)
    assert (tmp_path / ".falconet-rag" / "vectors.usearch").is_file()
    hybrid = rag("search", "schooner", "--ann", cwd=tmp_path)
    assert hybrid.returncode == 0 and "boats.txt" in hybrid.stdout
