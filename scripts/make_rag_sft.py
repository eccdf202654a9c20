"""Synthetic fine-tuning data for an answering model: documents (leases, invoices,
schedules, letters, policies) with random facts, questions about those facts, and
chat-format examples that answer from numbered passages, quoting one and citing it [n].

Everything is drawn from one seed, so a run is reproducible byte for byte. The text is
synthetic (scripts/rag_sft_templates.py); no outside data is read.

How an example is made: a document is cut into passages by the same chunking `falconet
rag ingest` uses (the embedder's token counts, the default ChunkSettings); the passage
stating the fact is put among distractor passages (half from documents of the same kind)
at a random place (with --first-share, that share of the time first, where search ranks
the best passage), and the user turn is the prompt `falconet rag ask` sends
(falconet.rag.answer.prompt_messages, the very function), so the model learns the prompt
it will be given. The assistant turn states the fact, cites the passage's number and
quotes its sentence.

Train and held-out share nothing a model could memorise: a fact value belongs to one
split only (a hash of the value decides), and every list of phrasings (document sentences,
questions) keeps its last variants for the held-out split alone.

Usage:
    python scripts/make_rag_sft.py --out data/rag_sft [--seed 0] [--train-docs 2000]
        [--heldout-docs 120] [--passages 5 | --passages 5,1,2,2,2] [--first-share 0.5]

Writes OUT/train.jsonl and OUT/heldout.jsonl ({"messages": [user, assistant]}, OpenAI's
shape), OUT/heldout_docs/*.md (the held-out documents as files), OUT/heldout_questions.jsonl
({"question", "fact", "field", "kind", "doc"}) for scripts/eval_rag_answers.py, and
OUT/manifest.json (the seed and the counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rag_sft_more_questions import MORE_QUESTIONS  # noqa: E402  (a sibling file)
from rag_sft_templates import (  # noqa: E402  (a sibling file, not a package)
    CITIES,
    COMMON_FILLER,
    COMPANY_KINDS,
    COMPANY_SUFFIXES,
    COMPANY_WORDS,
    EVENT_KINDS,
    EVENT_WORDS,
    FIRST_NAMES,
    KINDS,
    LAST_NAMES,
    MONTHS,
    QUOTES,
    SEASONS,
    STREET_KINDS,
    STREETS,
)

from falconet.documents import Document  # noqa: E402
from falconet.rag.answer import Source, flatten, prompt_messages  # noqa: E402
from falconet.rag.store import Hit  # noqa: E402

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 5  # one fact value in five (by hash) belongs to the held-out split


# -- random facts ---------------------------------------------------------------------


def _name(r: random.Random) -> str:
    return f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"


def _amount(r: random.Random) -> str:
    cents = r.choice([0, 0, 0, 50, r.randrange(100)])
    return f"${r.randrange(40, 6000):,}.{cents:02d}"


def _date(r: random.Random) -> str:
    return f"{r.choice(MONTHS)} {r.randrange(1, 29)}, {r.randrange(2024, 2029)}"


def _time(r: random.Random) -> str:
    hour, minute = r.randrange(7, 20), r.choice([0, 15, 30, 45])
    return f"{(hour - 1) % 12 + 1}:{minute:02d} {'a.m.' if hour < 12 else 'p.m.'}"


VALUES: dict[str, Callable[[random.Random], str]] = {
    "name": _name,
    "amount": _amount,
    "date": _date,
    "time": _time,
    "days": lambda r: f"{r.randrange(5, 121)} days",
    "months": lambda r: f"{r.randrange(1, 25)} months",
    "percent": lambda r: f"{r.randrange(1, 40) / 4:g}%",
    "room": lambda r: f"Room {r.randrange(1, 9)}{r.randrange(0, 40):02d}",
    "company": lambda r: (
        f"{r.choice(COMPANY_WORDS + CITIES)} {r.choice(COMPANY_KINDS)} {r.choice(COMPANY_SUFFIXES)}"
    ),
    "address": lambda r: (
        f"{r.randrange(1, 400)} {r.choice(STREETS)} {r.choice(STREET_KINDS)}, {r.choice(CITIES)}"
    ),
    "invoice": lambda r: f"INV-{r.randrange(10000, 100000)}",
    "reference": lambda r: (
        f"{r.choice(string.ascii_uppercase)}{r.choice('KLMNPRST')}-{r.randrange(1000, 10000)}"
    ),
    "event": lambda r: (
        f"{r.choice(SEASONS)} {r.choice(EVENT_WORDS)} {r.choice(EVENT_KINDS)} in {r.choice(CITIES)}"
    ),
}
# Which kind of value each field holds (the anchors too).
FIELDS = {
    "landlord": "name", "tenant": "name", "rent": "amount", "deposit": "amount",
    "notice": "days", "start": "date", "vendor": "company", "customer": "name",
    "total": "amount", "due": "date", "late_fee": "percent", "instructor": "name",
    "first_day": "date", "time": "time", "room": "room", "fee": "amount",
    "recipient": "name", "sender": "name", "appointment": "time", "appointment_day": "date",
    "balance": "amount", "effective": "date", "vacation": "days", "probation": "months",
    "expenses": "amount", "contact": "name",
}  # fmt: skip


def split_of(value: str) -> str:
    """The split a fact value belongs to: fixed by its text, so no value is in both."""
    return "heldout" if hashlib.sha256(value.encode()).digest()[0] % HELDOUT_EVERY == 0 else "train"


def draw(r: random.Random, kind: str, split: str) -> str:
    while True:
        value = VALUES[kind](r)
        if split_of(value) == split:
            return value


def phrasings(variants: list[str], split: str) -> list[str]:
    """The variants a split may use: the held-out split has the last two in five (at least
    one), training the rest."""
    cut = len(variants) - max(1, len(variants) * 2 // 5)
    return variants[:cut] if split == "train" else variants[cut:]


# -- documents ------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    name: str  # the file name, e.g. "lease-0007.md"
    kind: str
    anchor: str  # what names the document in a question
    text: str
    facts: dict[str, str]  # field -> value
    sentences: dict[str, str]  # field -> the sentence stating it, as in `text`


def _fields_in(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f and f not in ("a", "v")]


def make_document(r: random.Random, kind: str, index: int, split: str, anchors: set) -> Doc:
    spec = KINDS[kind]
    for _ in range(10_000):  # a question names one document only
        anchor = draw(r, spec["anchor"], split)
        if anchor not in anchors:
            break
    else:
        raise ValueError(f"ran out of distinct {spec['anchor']} values; make fewer documents")
    anchors.add(anchor)
    intro = r.choice(phrasings(spec["intro"], split))
    fields = _fields_in(intro) + list(spec["facts"])
    fields += [f for s in spec["facts"].values() for f in _fields_in(s[0]) if f not in fields]
    facts = {f: draw(r, FIELDS[f], split) for f in fields}
    first = intro.format(a=anchor, **facts)
    sentences = {f: first for f in _fields_in(intro)}
    for field, variants in spec["facts"].items():
        sentences[field] = r.choice(phrasings(variants, split)).format(
            v=facts[field], a=anchor, **{k: v for k, v in facts.items() if k != field}
        )
    body = [sentences[f] for f in spec["facts"]]
    body += r.sample(spec["filler"], r.randrange(3, 6)) + r.sample(COMMON_FILLER, r.randrange(1, 4))
    r.shuffle(body)
    paragraphs, at = [], 0
    while at < len(body):  # paragraphs of one to four sentences
        n = r.randrange(1, 5)
        paragraphs.append(" ".join(body[at : at + n]))
        at += n
    title = f"# {r.choice(spec['titles'])}: {anchor}"
    text = "\n\n".join([title, first, *paragraphs]) + "\n"
    return Doc(f"{kind}-{index:04d}.md", kind, anchor, text, facts, sentences)


def make_documents(r: random.Random, count: int, split: str) -> list[Doc]:
    kinds, anchors = list(KINDS), set()
    return [make_document(r, kinds[i % len(kinds)], i, split, anchors) for i in range(count)]


# -- passages and examples ------------------------------------------------------------


def passages(doc: Doc, count_tokens: Callable[[str], int]) -> list[Hit]:
    """The document's chunks as `falconet rag ingest` cuts them, as search hits."""
    from falconet.rag.chunking import chunk_document
    from falconet.rag.ingest import ChunkSettings

    settings = ChunkSettings()
    chunks = chunk_document(Document(doc.name, doc.text), count_tokens, settings.max_tokens,
                            settings.overlap_tokens)  # fmt: skip
    return [Hit(f"{doc.name}#{i}", doc.name, doc.name, i, c.text, c.start, c.end, c.section,
                None, 0.0) for i, c in enumerate(chunks)]  # fmt: skip


@dataclass(frozen=True)
class Question:
    doc: Doc
    field: str
    text: str

    @property
    def fact(self) -> str:
        return self.doc.facts[self.field]

    def as_dict(self) -> dict[str, str]:
        return {"question": self.text, "fact": self.fact, "field": self.field,
                "kind": self.doc.kind, "doc": self.doc.name}  # fmt: skip


def questions(r: random.Random, doc: Doc, split: str, more: bool = False) -> list[Question]:
    """One question per fact of `doc`, in a phrasing of the split (training's own and,
    with `more`, rag_sft_more_questions.py's)."""
    asked = KINDS[doc.kind]["questions"]
    extra = MORE_QUESTIONS[doc.kind] if more and split == "train" else {}
    return [Question(doc, f, r.choice(phrasings(asked[f], split) + extra.get(f, []))
                     .format(a=doc.anchor))
            for f in asked]  # fmt: skip


def relevant(hits: list[Hit], sentence: str) -> Hit | None:
    """The first passage holding the whole sentence (a chunk may cut one in two)."""
    flat = flatten(sentence)
    return next((h for h in hits if flat in flatten(h.text)), None)


@dataclass(frozen=True)
class Example:
    question: Question
    hits: list[Hit]  # the passages of the prompt, in order
    cited: int  # the number of the passage holding the fact
    messages: list[dict[str, str]]  # user (rag ask's prompt), assistant

    def as_json(self) -> dict:
        return {"messages": self.messages}


def example(
    r: random.Random, q: Question, hits: dict[str, list[Hit]], kinds: dict[str, list[str]],
    n_passages: int, first_share: float = 0.0,
) -> Example | None:  # fmt: skip
    """A chat example for `q`, or None where no passage holds its sentence whole."""
    sentence = q.doc.sentences[q.field]
    right = relevant(hits[q.doc.name], sentence)
    if right is None:
        return None
    same_kind = [d for d in kinds[q.doc.kind] if d != q.doc.name]
    others = [d for k, names in kinds.items() if k != q.doc.kind for d in names]
    picked: list[Hit] = []
    tries = 0
    while len(picked) < n_passages - 1:
        if tries == 1000 * n_passages:
            raise ValueError(f"too few passages for {n_passages} a prompt; make more documents")
        # half from the same kind while it has passages to give, the rest from any other
        same = len(picked) < (n_passages - 1) // 2 and tries < 20 * n_passages
        pool = same_kind if (same or not others) and same_kind else others or same_kind
        tries += 1
        hit = r.choice(hits[r.choice(pool)])
        # a distractor never holds the answer, so the cited passage is the one right answer
        if hit not in picked and q.fact not in flatten(hit.text):
            picked.append(hit)
    # search ranks the best passage first: with first_share, that often where the answer is
    first = first_share > 0 and r.random() < first_share
    picked.insert(0 if first else r.randrange(n_passages), right)
    sources = [Source(i + 1, h, flatten(h.text)) for i, h in enumerate(picked)]
    n = picked.index(right) + 1
    answer = r.choice(KINDS[q.doc.kind]["answers"][q.field]).format(v=q.fact)
    reply = r.choice(QUOTES).format(answer=answer, n=n, quote=flatten(sentence))
    messages = [*prompt_messages(q.text, sources), {"role": "assistant", "content": reply}]
    return Example(q, picked, n, messages)


def build_split(
    seed: int, split: str, n_docs: int, n_passages: list[int], count_tokens: Callable[[str], int],
    first_share: float = 0.0, more_questions: bool = False,
) -> tuple[list[Doc], list[Question], list[Example]]:  # fmt: skip
    """A split's documents, questions (one per fact) and chat examples, the i-th question's
    prompt holding n_passages[i % len(n_passages)] passages."""
    r = random.Random(f"{seed}:{split}")
    docs = make_documents(r, n_docs, split)
    hits = {d.name: passages(d, count_tokens) for d in docs}
    kinds: dict[str, list[str]] = {}
    for d in docs:
        kinds.setdefault(d.kind, []).append(d.name)
    qs = [q for d in docs for q in questions(r, d, split, more_questions)]
    examples = [
        e
        for i, q in enumerate(qs)
        if (e := example(r, q, hits, kinds, n_passages[i % len(n_passages)], first_share))
        is not None
    ]
    return docs, qs, examples


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-docs", type=int, default=2000)
    p.add_argument("--heldout-docs", type=int, default=120)
    p.add_argument(
        "--passages", default="5",
        help="passages per prompt (default 5), or a list taken in turn question by question "
        "(5,1: a long prompt then a short one, which pack into one 2048-token row)",
    )  # fmt: skip
    p.add_argument(
        "--first-share", type=float, default=0.0,
        help="share of prompts whose answering passage is [1], where search ranks the best "
        "passage (default 0: at a random place)",
    )  # fmt: skip
    p.add_argument(
        "--more-questions", action="store_true",
        help="training questions also in rag_sft_more_questions.py's phrasings (the "
        "held-out split is unchanged)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not 0 <= args.first_share <= 1:
        p.error(f"--first-share must be in [0, 1], got {args.first_share}")
    try:
        args.passages = [int(n) for n in args.passages.split(",")]
    except ValueError:
        p.error(f"--passages must be a number or a comma-separated list, got {args.passages!r}")
    if min(args.passages) < 1 or min(args.train_docs, args.heldout_docs) < 2 * len(KINDS):
        p.error(f"--passages must be >= 1 and each split needs >= {2 * len(KINDS)} documents")
    from falconet.rag.embed import default_embedder

    count = default_embedder().count_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": args.seed, "passages": args.passages, "first_share": args.first_share,
                "more_questions": args.more_questions}  # fmt: skip
    for split, n_docs in (("train", args.train_docs), ("heldout", args.heldout_docs)):
        docs, qs, examples = build_split(args.seed, split, n_docs, args.passages, count,
                                         args.first_share, args.more_questions)  # fmt: skip
        _write_jsonl(args.out / f"{split}.jsonl", [e.as_json() for e in examples])
        manifest[split] = {"documents": len(docs), "questions": len(qs), "examples": len(examples)}
        if split == "heldout":
            folder = args.out / "heldout_docs"
            folder.mkdir(exist_ok=True)
            for d in docs:
                (folder / d.name).write_text(d.text, encoding="utf-8")
            _write_jsonl(args.out / "heldout_questions.jsonl", [q.as_dict() for q in qs])
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
