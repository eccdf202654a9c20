"""Retrieval quality on a labeled set: recall@5 of BM25, vector and hybrid search.

The corpus is 33 chapters of the King James Bible (public domain) in tests/data/rag_corpus
(written by scripts/make_rag_corpus.py); tests/data/rag_questions.json holds questions in
modern English, paraphrased so that they share few words with the verses, each with the
verbatim passage (about a verse) of its file that answers it. A question is answered at
k when one of the k chunks returned holds the passage: the chunk's text contains it, or
the chunk covers at least half of the passage's characters in the same file (a verse cut
by a chunk boundary still counts for the chunk holding most of it).

Acceptance (issue 6): hybrid recall@5 >= the better of BM25 and vector; (issue 18) each
mode's recall on PostgreSQL within 0.01 of SQLite's. Both stores are filled from one
embedding of the corpus (`Memo`). Run with -s to see the tables; they are also in the
assertion messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from falconet.rag.embed import default_embedder
from falconet.rag.ingest import ingest
from falconet.rag.retrieve import MODES, search
from falconet.rag.store import Hit
from falconet.rag.stores import open_store
from tests.pg_tools import new_schema, schema_url

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "rag_corpus"
QUESTIONS = DATA / "rag_questions.json"
K = 5
MIN_RECALL = 0.5  # each mode; the measured values are well above (see the table)
BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Question:
    id: int
    question: str
    file: str
    passage: str


def load_questions() -> list[Question]:
    data = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    return [Question(**q) for q in data["questions"]]


def passage_span(q: Question) -> tuple[int, int]:
    start = (CORPUS / q.file).read_text(encoding="utf-8").index(q.passage)
    return start, start + len(q.passage)


def answers(hit: Hit, q: Question, span: tuple[int, int]) -> bool:
    if q.passage in hit.text:
        return True
    if Path(hit.source).name != q.file:
        return False
    covered = min(hit.end, span[1]) - max(hit.start, span[0])
    return 2 * covered >= span[1] - span[0]


def test_questions_quote_their_files():
    questions = load_questions()
    assert len(questions) >= 50
    assert len({q.id for q in questions}) == len(questions)
    assert len({q.question for q in questions}) == len(questions)
    chapters = {p.name for p in CORPUS.iterdir() if p.name != "README.md"}
    for q in questions:
        assert q.file in chapters, f"question {q.id}: no file {q.file}"
        text = (CORPUS / q.file).read_text(encoding="utf-8")
        assert text.count(q.passage) == 1, f"question {q.id}: passage not once in {q.file}"
        assert q.question not in text
    assert {q.file for q in questions} == chapters  # every chapter is asked about


@dataclass
class Recall:
    hits: dict[str, int]
    missed: dict[str, list[int]]
    n: int

    def table(self) -> str:
        rows = [f"recall@{K} over {self.n} questions:"]
        rows += [f"  {mode:<7} {self.hits[mode] / self.n:.3f}" for mode in MODES]
        return "\n".join(rows)


class Memo:
    """The real embedder, each text embedded once: the second backend gets the same
    vectors without paying for them again."""

    def __init__(self, inner):
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.vectors: dict[str, object] = {}

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: list[str]):
        todo = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if todo:
            self.vectors.update(zip(todo, self.inner.embed(todo), strict=True))
        return np.stack([self.vectors[t] for t in texts])


@pytest.fixture(scope="module")
def recalls(request, tmp_path_factory) -> dict[str, Recall]:
    """Recall of each backend, both filled with the same vectors."""
    embedder = Memo(default_embedder())
    specs = {
        "sqlite": str(tmp_path_factory.mktemp("rag_store")),
        "postgres": schema_url(request.getfixturevalue("pg_url"), new_schema()),
    }
    # One intra-op thread: on the 2 shared cores of the test machine two threads spin
    # against each other and against other processes (a query's embedding took 225 ms
    # instead of 25 ms under load), and this module is the bulk of the embedding work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {backend: _measure(spec, embedder) for backend, spec in specs.items()}
    finally:
        torch.set_num_threads(threads)


def _measure(spec: str, embedder: Memo) -> Recall:
    with open_store(spec) as store:
        report = ingest(store, [CORPUS], embedder)
        assert not report.skipped, report.skipped
        questions = load_questions()
        result = Recall({m: 0 for m in MODES}, {m: [] for m in MODES}, len(questions))
        for q in questions:
            span = passage_span(q)
            for mode in MODES:
                hits = search(store, q.question, k=K, mode=mode, embedder=embedder)
                assert len(hits) <= K
                if any(answers(h, q, span) for h in hits):
                    result.hits[mode] += 1
                else:
                    result.missed[mode].append(q.id)
    print(f"\n{type(store).__name__}: {result.table()}")
    return result


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_mode_finds_most_answers(recalls, backend):
    recall = recalls[backend]
    for mode in MODES:
        assert recall.hits[mode] / recall.n >= MIN_RECALL, recall.table()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_at_least_the_better_single_mode(recalls, backend):
    recall = recalls[backend]
    best = max(recall.hits["bm25"], recall.hits["vector"])
    assert recall.hits["hybrid"] >= best, (
        f"{recall.table()}\nmissed by hybrid: {recall.missed['hybrid']}"
    )


def test_postgres_recall_equals_sqlite(recalls):
    a, b = recalls["sqlite"], recalls["postgres"]
    for mode in MODES:
        assert abs(a.hits[mode] - b.hits[mode]) / a.n <= 0.01, (
            f"{mode}: sqlite\n{a.table()}\npostgres\n{b.table()}"
        )
