"""Answers with citations: retrieved passages, numbered, in a prompt that fits the model's
context; the model's answer streamed through the engine; the sources always returned.

The prompt (Falcon-instruct's "User: ... / Falcon:" format, which the CLI's chat uses
when a tokenizer has no chat template, or the tokenizer's own template)::

    Answer the question using only the numbered passages. Cite the passages you use
    like [1].

    [1] (genesis-4.txt) And Cain talked with Abel his brother ...
    [2] ...

    Question: Who killed Abel?

Fitting the context: the answer's `max_tokens` are reserved first; then passages are
added best first, each cut at a word boundary to an equal share of what is left, and a
passage that would not get at least MIN_PASSAGE_TOKENS is dropped. The sources list
holds exactly the passages the model saw, numbered as in the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from falconet.engine import Engine
from falconet.errors import RagError
from falconet.rag.store import Hit
from falconet.sampling import SamplingParams
from falconet.tokenizer import Tokenizer

INSTRUCTION = (
    "Answer the question using only the numbered passages. Cite the passages you use like [1]."
)
MIN_PASSAGE_TOKENS = 16


def location(hit: Hit, name_only: bool = False) -> str:
    """Where a passage comes from: "file, page 3, Section" (the file's name or full path)."""
    where = Path(hit.source).name if name_only else hit.source
    if hit.page is not None:
        where += f", page {hit.page}"
    if hit.section:
        where += f", {hit.section}"
    return where


@dataclass(frozen=True)
class Source:
    number: int  # the [n] used in the prompt and the answer
    hit: Hit
    text: str  # the passage as the model saw it (possibly cut)

    def label(self) -> str:
        return location(self.hit, name_only=True)

    def passage(self) -> str:
        """The passage as numbered in the prompt."""
        return f"[{self.number}] ({self.label()}) {self.text}"

    def as_dict(self) -> dict:
        h = self.hit
        return {"number": self.number, "source": h.source, "doc_id": h.doc_id,
                "chunk_id": h.chunk_id, "section": h.section, "page": h.page,
                "start": h.start, "end": h.end, "score": h.score, "text": self.text}  # fmt: skip


def _render(tokenizer: Tokenizer, question: str, passages: list[str]) -> list[int]:
    body = "\n\n".join(passages)
    content = f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _cut(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
    """`text` shortened at a word boundary to at most max_tokens tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[:max_tokens])
    space = cut.rfind(" ")
    return (cut[:space] if space > len(cut) // 2 else cut).rstrip() + " ..."


def build_prompt(
    tokenizer: Tokenizer, question: str, hits: list[Hit], context: int, max_tokens: int
) -> tuple[list[int], list[Source]]:
    """Prompt ids (prompt + max_tokens <= context) and the sources it numbers."""
    if not question.strip():
        raise RagError("the question is empty")
    budget = context - max_tokens - len(_render(tokenizer, question, []))
    if budget < 0:
        raise RagError(
            f"the question alone leaves no room for a {max_tokens}-token answer in the "
            f"model's {context}-token context; ask a shorter question or lower --max-tokens"
        )
    sources: list[Source] = []
    for hit in hits:
        # What a further passage may take: an equal share of what the others left.
        share = budget // max(1, len(hits) - len(sources))
        if share < MIN_PASSAGE_TOKENS:
            break
        n = len(sources) + 1
        prefix = Source(n, hit, "").passage()
        text = _cut(
            tokenizer,
            " ".join(hit.text.split()),
            share - len(tokenizer.encode(prefix, add_special_tokens=False)) - 2,
        )
        candidate = sources + [Source(n, hit, text)]
        ids = _render(tokenizer, question, [s.passage() for s in candidate])
        if len(ids) + max_tokens > context:
            break
        sources = candidate
        budget = context - max_tokens - len(ids)
    return _render(tokenizer, question, [s.passage() for s in sources]), sources


def stream_answer(
    engine: Engine,
    question: str,
    hits: list[Hit],
    params: SamplingParams,
) -> tuple[list[Source], Iterator[str]]:
    """The numbered sources and an iterator of answer text pieces (greedy by default).
    The engine must be running (`start()`) or is driven by the iterator itself."""
    ids, sources = build_prompt(
        engine.tokenizer, question, hits, engine.max_context, params.max_tokens
    )
    [stream] = engine.submit([ids], [params])

    def pieces() -> Iterator[str]:
        if not engine.alive:
            while engine.step():
                pass
        try:
            for delta in stream:
                if delta.finish_reason == "error":
                    raise RagError(f"generation failed: {delta.error}")
                if delta.text:
                    yield delta.text
        finally:
            stream.cancel()

    return sources, pieces()
