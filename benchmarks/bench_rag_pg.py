"""Benchmark the RAG store on PostgreSQL + pgvector against SQLite: query latency at N chunks.

Both stores are filled with the same synthetic chunks as benchmarks/bench_rag.py makes
(`fill_store`: random words drawn from the corpus's own word frequencies, random unit
vectors of the embedder's dimension, written through `upsert_document` in documents of
100 chunks). Each query is one of the labeled questions (tests/data/rag_questions.json),
cycled, run through `falconet.rag.retrieve.search` in every mode with k = 5. The questions
are embedded once up front, so the times are the stores' (plus RRF), not the embedder's;
the embedding time is shown on its own line (add it to vector and hybrid for what a user
waits). PostgreSQL answers vector queries by an exact scan up to
EXACT_SEARCH_MAX_CHUNKS chunks and through its HNSW index above; the table says which.

The PostgreSQL server is `--url` (a database whose user may create a schema; the
benchmark's schema is dropped at the end), or one started from pgserver's binaries in a
temp dir as the tests do (tests/pg_tools.py). Target (issue 18): hybrid p95 < 100 ms at
100k chunks on both.

    python benchmarks/bench_rag_pg.py                     # 2,000 chunks: a quick look
    python benchmarks/bench_rag_pg.py --chunks 100000     # the issue's figure
    python benchmarks/bench_rag_pg.py --smoke             # 500 chunks, 10 queries: does it run
    python benchmarks/bench_rag_pg.py --chunks 100000 --stores sqlite   # SQLite alone (~1 min)

The fill rate (chunks/s) is printed for each store. PostgreSQL fills at ~100 chunks/s
here (500 chunks profiled, load ~7): a third is the server inserting each chunk (its
HNSW and full-text indexes kept up to date), a third the store's Python tokenizer for
the postings, a sixth the postings' COPY; round trips are not the cost (one pipelined
executemany for a document's chunks measured no faster). So 100k chunks take ~15-20
minutes to fill before the queries are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_rag import corpus_words, fill_store, percentiles  # noqa: E402
from falconet.rag.embed import default_embedder  # noqa: E402
from falconet.rag.retrieve import MODES, search  # noqa: E402
from falconet.rag.store_postgres import EXACT_SEARCH_MAX_CHUNKS  # noqa: E402
from falconet.rag.stores import open_store  # noqa: E402

K = 5


class Embedded:
    """The real embedder's vectors for the questions, computed before the timing."""

    def __init__(self, inner, questions: list[str]):
        self.id, self.dim = inner.id, inner.dim
        t0 = time.perf_counter()
        vectors = np.concatenate([inner.embed([q]) for q in questions])
        self.seconds_each = (time.perf_counter() - t0) / len(questions)
        self.vectors = dict(zip(questions, vectors, strict=True))

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def bench(spec: str, args, embedder: Embedded, questions, words, probs) -> dict:
    with open_store(spec) as store:
        t0 = time.perf_counter()
        fill_store(store, args.chunks, args.words, words, probs, embedder.dim, embedder.id,
                   seed=args.chunks)  # fmt: skip
        fill_s = time.perf_counter() - t0
        search(store, questions[0], k=K, mode="hybrid", embedder=embedder)  # caches warm
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(args.queries):
            q = questions[i % len(questions)]
            for mode in MODES:  # modes take turns, so drift on a shared machine hits all alike
                t0 = time.perf_counter()
                hits = search(store, q, k=K, mode=mode, embedder=embedder)
                times[mode].append(time.perf_counter() - t0)
                assert len(hits) == K, (mode, q, len(hits))
    return {"fill_seconds": fill_s, "latency_ms": {m: percentiles(t) for m, t in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=2000, help="synthetic chunks per store")
    ap.add_argument("--queries", type=int, default=100, help="timed queries per mode")
    ap.add_argument("--words", type=int, default=150, help="words per synthetic chunk")
    ap.add_argument("--url", help="a PostgreSQL server (default: start one from pgserver)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "tests" / "data" / "rag_corpus")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as bench_rag.py)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="500 chunks, 10 queries: a quick run")
    ap.add_argument("--stores", default="sqlite,postgres",
                    help="which stores, comma-separated (sqlite alone needs no PostgreSQL)")  # fmt: skip
    args = ap.parse_args()
    if args.smoke:
        args.chunks, args.queries = 500, 10
    torch.set_num_threads(args.threads)
    questions_file = ROOT / "tests" / "data" / "rag_questions.json"
    questions = [q["question"] for q in json.loads(questions_file.read_text())["questions"]]
    embedder = Embedded(default_embedder(), questions)
    words, probs = corpus_words(args.corpus)

    stores = args.stores.split(",")
    if not stores or not set(stores) <= {"sqlite", "postgres"}:
        ap.error(f"--stores takes sqlite and/or postgres, got {args.stores!r}")
    server = None
    url = args.url
    if url is None and "postgres" in stores:
        from tests.pg_tools import PostgresServer

        server = PostgresServer()
        url = server.url
    schema = "bench_" + secrets.token_hex(4)
    sep = "&" if url and "?" in url else "?"
    results: dict = {"chunks": args.chunks, "queries": args.queries, "embedder": embedder.id}
    print(f"{args.chunks} synthetic chunks of {args.words} words, {args.queries} queries per "
          f"mode, k={K}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            specs = {"sqlite": tmp, "postgres": f"{url}{sep}schema={schema}"}
            for name in stores:
                spec = specs[name]
                results[name] = bench(spec, args, embedder, questions, words, probs)
                fill_s = results[name]["fill_seconds"]
                print(f"  {name}: filled in {fill_s:.1f} s ({args.chunks / fill_s:.0f} chunks/s)",
                      flush=True)  # fmt: skip
    finally:
        if args.url is not None and "postgres" in stores:
            import psycopg

            with psycopg.connect(args.url, autocommit=True) as db:
                db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if server is not None:
            server.stop()

    path = "HNSW index" if args.chunks > EXACT_SEARCH_MAX_CHUNKS else "exact scan"
    print(f"\n  store      mode      p50 ms   p95 ms   (PostgreSQL vector search: {path})")
    for name in stores:
        for mode in MODES:
            p50, p95 = results[name]["latency_ms"][mode]
            print(f"  {name:<9}  {mode:<7} {p50:>7.1f}  {p95:>7.1f}")
    print(f"  query embedding (not in the rows above): {embedder.seconds_each * 1000:.1f} ms")
    for name in stores:
        p95 = results[name]["latency_ms"]["hybrid"][1] + embedder.seconds_each * 1000
        print(f"  {name}: hybrid p95 + embedding {p95:.0f} ms (target < 100 ms at 100k chunks)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
