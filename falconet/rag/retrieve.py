"""Retrieval: BM25, vector, and hybrid search fused by reciprocal rank fusion (RRF).

RRF (Cormack et al., 2009) scores a chunk by the sum over rankings of 1 / (k + rank),
rank counted from 1; k = 60 is the paper's constant and what Elasticsearch and
LlamaIndex use. It needs no score calibration between BM25 and cosine similarity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, get_args

from falconet.errors import RagError
from falconet.rag.embed import Embedder
from falconet.rag.store import DocumentStore, Hit

RRF_K = 60
# The search modes, for `search`, `falconet rag search/ask --mode` and POST /v1/rag/query.
Mode = Literal["hybrid", "bm25", "vector"]
MODES: tuple[str, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "hybrid"


def needs_embedder(mode: str) -> bool:
    """Whether a search in `mode` embeds the query (every mode but BM25 does)."""
    return mode != "bm25"


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[str]], k: int = RRF_K
) -> list[tuple[str, float]]:
    """Fuse rankings of ids (best first) into one: (id, score), best first, ties by id."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def search(
    store: DocumentStore,
    query: str,
    k: int = 5,
    mode: Mode = DEFAULT_MODE,
    embedder: Embedder | None = None,
    candidates: int | None = None,
    ann: bool = False,
) -> list[Hit]:
    """The k best chunks for `query`. Hybrid fuses the top `candidates` (default
    max(4k, 20)) of each ranking; its hits carry the RRF score. `ann` takes the vector
    candidates from the approximate usearch index (falconet.rag.ann) instead of the exact
    numpy scan (the default)."""
    if mode not in MODES:
        raise RagError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
    if k < 1:
        raise RagError(f"k must be at least 1, got {k}")
    if not needs_embedder(mode):
        return store.search_bm25(query, k)
    if embedder is None:
        raise RagError(f"{mode} search needs an embedder")
    if store.embedder_id is not None and store.embedder_id != embedder.id:
        raise RagError(
            f"the store's vectors come from {store.embedder_id}, not {embedder.id}: run "
            "`falconet rag sync` or `falconet rag ingest` to re-embed, or search with --mode bm25"
        )
    vector = embedder.embed([query])[0]
    if mode == "vector":
        return store.search_vector(vector, k, ann=True) if ann else store.search_vector(vector, k)
    n = candidates or max(4 * k, 20)
    by_id: dict[str, Hit] = {}
    rankings = []
    vector_hits = (
        store.search_vector(vector, n, ann=True) if ann else store.search_vector(vector, n)
    )
    for hits in (store.search_bm25(query, n), vector_hits):
        rankings.append([h.chunk_id for h in hits])
        for h in hits:
            by_id.setdefault(h.chunk_id, h)
    fused = reciprocal_rank_fusion(rankings)[:k]
    return [dataclasses.replace(by_id[cid], score=score) for cid, score in fused]
