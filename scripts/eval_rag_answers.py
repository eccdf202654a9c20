"""How often `rag ask` answers with the right fact and cites the passage that holds it, on
the held-out documents and questions written by scripts/make_rag_sft.py.

The held-out documents are ingested into a temporary store (the default embedder and
chunking); each question is then answered as `falconet rag ask` answers it, through the
same library calls: hybrid search for k passages, the numbered prompt, the model's answer
at the default length, greedy. Scores, per question:

- exact fact: the answer contains the expected fact, both normalized (lower case, every
  run of characters other than letters and digits as one space, matched on whole words:
  "$1,250.00" matches "1,250.00" and not "$11,250.00");
- citation: the answer cites [n] for at least one passage that holds the fact;
- in prompt: a passage the model saw holds the fact (the ceiling for the two above; a
  small context cuts passages short or leaves them out);
- retrieved: one of the k retrieved passages, whole, holds the fact (search's share).

It also reports the prompt's length in the model's tokens with all k passages whole (what
a model's context must hold to see them uncut) beside the model's context.

Usage:
    python scripts/eval_rag_answers.py --data data/rag_sft [--model M] [--limit N]
        [-k 5] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_NOT_WORD = re.compile(r"[^0-9a-z]+")
_CITATION = re.compile(r"\[(\d+)\]")


def normalize(text: str) -> str:
    """Lower case, every run of characters other than letters and digits one space."""
    return _NOT_WORD.sub(" ", text.lower()).strip()


def has_fact(text: str, fact: str) -> bool:
    """Whether `text` states `fact`: normalized, on whole-word boundaries."""
    want = normalize(fact)
    return bool(want) and f" {want} " in f" {normalize(text)} "


def citations(answer: str) -> set[int]:
    """The passage numbers an answer cites as [n]."""
    return {int(n) for n in _CITATION.findall(answer)}


@dataclass(frozen=True)
class Scored:
    question: str
    fact: str
    answer: str
    exact: bool  # the answer states the fact
    citation: bool  # it cites a passage that holds the fact
    in_prompt: bool  # some passage the model saw holds the fact
    retrieved: bool  # some retrieved passage, whole, holds the fact
    sources_seen: int  # passages in the prompt (a small context cuts some)
    full_prompt_tokens: int  # the prompt with all k passages whole


def score(
    question: str, fact: str, answer: str, passages: dict[int, str],
    retrieved: list[str] | None = None, full: int = 0,
) -> Scored:  # fmt: skip
    """One answer scored against its expected fact and the numbered passages it saw
    (`retrieved`: the whole texts of the passages search found; default: those seen)."""
    holding = {n for n, text in passages.items() if has_fact(text, fact)}
    found = passages.values() if retrieved is None else retrieved
    return Scored(question, fact, answer, has_fact(answer, fact),
                  bool(citations(answer) & holding), bool(holding),
                  any(has_fact(t, fact) for t in found), len(passages), full)  # fmt: skip


def summary(rows: list[Scored]) -> dict[str, float]:
    n = max(1, len(rows))
    return {
        "questions": len(rows),
        "exact_fact": sum(r.exact for r in rows) / n,
        "citation": sum(r.citation for r in rows) / n,
        "in_prompt": sum(r.in_prompt for r in rows) / n,
        "retrieved": sum(r.retrieved for r in rows) / n,
        "sources_seen_mean": statistics.fmean(r.sources_seen for r in rows) if rows else 0,
        "full_prompt_tokens_mean": statistics.fmean(r.full_prompt_tokens for r in rows)
        if rows
        else 0,
        "full_prompt_tokens_max": max((r.full_prompt_tokens for r in rows), default=0),
    }


def load_questions(data: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in (data / "heldout_questions.jsonl").open(encoding="utf-8")]
    if limit is not None and limit < len(rows):
        step = len(rows) / limit  # spread over every kind of document and field
        rows = [rows[int(i * step)] for i in range(limit)]
    return rows


def evaluate(data: Path, model: str | None, limit: int | None, k: int) -> tuple[list[Scored], int]:
    """Every (or `limit` evenly spread) held-out question answered and scored; the model's
    context beside."""
    import falconet
    from falconet.engine import Engine
    from falconet.llm import default_model_path
    from falconet.rag.answer import build_prompt, stream_answer
    from falconet.rag.embed import default_embedder
    from falconet.rag.ingest import ingest
    from falconet.rag.retrieve import DEFAULT_MODE, search
    from falconet.rag.stores import open_store
    from falconet.sampling import SamplingParams

    questions = load_questions(data, limit)
    embedder = default_embedder()
    llm = falconet.load(model or default_model_path(answering=True))  # rag ask's default
    engine = Engine.from_llm(llm, max_batch=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open_store(Path(tmp) / "store") as store:
        ingest(store, [data / "heldout_docs"], embedder)
        engine.start()
        try:
            for q in questions:
                hits = search(store, q["question"], k, DEFAULT_MODE, embedder)
                whole, _ = build_prompt(llm.tokenizer, q["question"], hits, 1 << 30, 1)
                params = SamplingParams(max_tokens=1)  # the default length replaces it
                sources, pieces = stream_answer(engine, q["question"], hits, params,
                                                default_length=True)  # fmt: skip
                answer = "".join(pieces)
                passages = {s.number: s.text for s in sources}
                texts = [h.text for h in hits]
                rows.append(score(q["question"], q["fact"], answer, passages, texts, len(whole)))
        finally:
            engine.shutdown()
    return rows, engine.max_context


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="make_rag_sft.py's --out folder")
    p.add_argument(
        "--model",
        default=None,
        help="model folder (default: rag ask's, the embedded falconet-tiny-instruct)",
    )
    p.add_argument("--limit", type=int, default=None, help="questions to ask (spread evenly)")
    p.add_argument("-k", type=int, default=5, help="passages retrieved (default 5)")
    p.add_argument("--out", type=Path, default=None, help="write each scored answer here")
    args = p.parse_args(argv)
    rows, context = evaluate(args.data, args.model, args.limit, args.k)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows), encoding="utf-8")
    result = {"model": args.model or "falconet-tiny-instruct (embedded)", "context": context, "k": args.k,
              **summary(rows)}  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
