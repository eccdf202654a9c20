"""An optional approximate-nearest-neighbour index (usearch HNSW) over the store's vectors.

It is a rebuildable cache, never a source of truth: `<store dir>/vectors.usearch` holds the
index and `vectors.usearch.json` records the committed store state it reflects (the meta
write counter, the embedder id, dim, row count) and the sha256 of the index file. Both are
written atomically (temp -> fsync -> rename -> fsync(dir)). On load, a missing, unreadable
or corrupt file, or one that records another write counter or embedder than the store's
current one, is rebuilt from the store's committed embeddings, read in one transaction.

Keys are SQLite chunk rowids; the index is rebuilt on every committed write, so a rowid
reused after a delete can never point at the wrong chunk. Exact numpy search stays the
default (`VectorSource.search_vector(ann=False)`); the hits' scores are recomputed exactly
from the stored vectors, so only which chunks are found is approximate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from falconet.durable import atomic_write, atomic_write_text
from falconet.errors import RagError


class VectorSource(Protocol):
    """What the index needs of a store (SQLiteStore in rag/store_sqlite.py has it): where it
    lives, its committed write state, and its vectors as of one committed state."""

    path: Path

    def write_state(self) -> tuple[str | None, str | None]: ...
    def vector_snapshot(self) -> tuple[str | None, str | None, np.ndarray, np.ndarray]: ...


INDEX_FILE = "vectors.usearch"
SIDECAR_SUFFIX = ".json"
FORMAT = 1
CONNECTIVITY = 32
EXPANSION_ADD = 128
EXPANSION_SEARCH = 128


def _usearch():
    try:
        from usearch.index import Index
    except ImportError as e:
        raise RagError(
            "ANN search needs usearch: pip install falconet[ann] (or search without --ann)"
        ) from e
    return Index


class AnnIndex:
    """A usearch cosine index of one committed state of a store's vectors."""

    def __init__(self, index, generation: str | None, embedder: str | None, dim: int, rows: int):
        self.index = index
        self.generation = generation
        self.embedder = embedder
        self.dim = dim
        self.rows = rows
        self.rebuilt = False  # True when load_or_build had to build it (tests, logs)

    @staticmethod
    def path_for(store: VectorSource) -> Path:
        return store.path.parent / INDEX_FILE

    @staticmethod
    def sidecar_for(store: VectorSource) -> Path:
        path = AnnIndex.path_for(store)
        return path.with_name(path.name + SIDECAR_SUFFIX)

    @classmethod
    def load_or_build(cls, store: VectorSource) -> AnnIndex:
        """The index file if it reflects the store's current committed state, else a
        rebuild from the store (saved atomically)."""
        Index = _usearch()
        generation, embedder = store.write_state()
        loaded = cls._load(store, Index, generation, embedder)
        if loaded is not None:
            return loaded
        return cls.build(store)

    @classmethod
    def _load(cls, store: VectorSource, Index, generation, embedder) -> AnnIndex | None:
        try:
            info = json.loads(cls.sidecar_for(store).read_text("utf-8"))
            data = cls.path_for(store).read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            return None
        if info.get("generation") != generation or info.get("embedder") != embedder:
            return None  # stale: the store has committed writes since
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            return None  # torn, truncated or replaced: never trust it
        rows, dim = info.get("rows"), info.get("dim")
        if rows == 0:
            return cls(None, generation, embedder, int(dim or 0), 0)
        try:
            index = Index(ndim=int(dim), metric="cos", dtype="f32")
            index.load(data)
        except Exception:
            return None
        if len(index) != rows or index.ndim != dim:
            return None
        index.expansion_search = EXPANSION_SEARCH
        return cls(index, generation, embedder, int(dim), int(rows))

    @classmethod
    def build(cls, store: VectorSource) -> AnnIndex:
        """Index the store's committed vectors (one read transaction) and save it."""
        Index = _usearch()
        generation, embedder, rowids, matrix = store.vector_snapshot()
        dim = int(matrix.shape[1]) if matrix.ndim == 2 else 0
        index = None
        if len(rowids):
            index = Index(
                ndim=dim,
                metric="cos",
                dtype="f32",
                connectivity=CONNECTIVITY,
                expansion_add=EXPANSION_ADD,
                expansion_search=EXPANSION_SEARCH,
            )
            index.add(rowids.astype(np.uint64), np.ascontiguousarray(matrix, dtype=np.float32))
            data = bytes(index.save())
        else:
            data = b""
        path = cls.path_for(store)
        # The index first, then the sidecar that vouches for it (with its hash): a crash
        # between the two leaves a sidecar whose hash does not match, so a rebuild.
        atomic_write(path, lambda p: p.write_bytes(data))
        info = {
            "format": FORMAT,
            "generation": generation,
            "embedder": embedder,
            "dim": dim,
            "rows": int(len(rowids)),
            "sha256": hashlib.sha256(data).hexdigest(),
            "store": store.path.name,
        }
        atomic_write_text(cls.sidecar_for(store), json.dumps(info, indent=1) + "\n")
        built = cls(index, generation, embedder, dim, int(len(rowids)))
        built.rebuilt = True
        return built

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk rowids, cosine scores) of the approximate k nearest, best first."""
        if self.index is None or self.rows == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise RagError(
                f"query vector has {q.shape[0]} dimensions; the store's embedder "
                f"{self.embedder} has {self.dim}"
            )
        matches = self.index.search(q, min(k, self.rows))
        keys = np.asarray(matches.keys, dtype=np.int64)
        return keys, 1.0 - np.asarray(matches.distances, dtype=np.float32)
