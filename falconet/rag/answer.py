"""Answers with citations: retrieved passages, numbered, in a prompt that fits the model's
context; the model's answer streamed through the engine; the sources always returned.

The prompt (Falcon-instruct's "User: ... / Falcon:" format, which the CLI's chat uses
when a tokenizer has no chat template, or the tokenizer's own template)::

    Answer the question using only the numbered passages. Cite the passages you use
    like [1].

    [1] (genesis-4.txt) And Cain talked with Abel his brother ...
    [2] ...

    Question: Who killed Abel?

Fitting the context: the answer's `max_tokens` are reserved first (when none was asked
for: RAG_MAX_TOKENS or a quarter of what the bare question leaves, whichever is less,
and the answer then gets what the passages left, up to RAG_MAX_TOKENS); then passages
are added best first, each cut at a word boundary to an equal share of what is left, and a
passage that would not get at least MIN_PASSAGE_TOKENS is dropped. The sources list
holds exactly the passages the model saw, numbered as in the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from falconet.engine import Engine
from falconet.errors import RagError
from falconet.rag.store import Hit
from falconet.request_rules import RAG_MAX_TOKENS, default_max_tokens
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


def flatten(text: str) -> str:
    """A passage as the prompt shows it: on one line, runs of whitespace as one space."""
    return " ".join(text.split())


def prompt_messages(question: str, sources: list[Source]) -> list[dict[str, str]]:
    """The chat turns of the answering prompt: one user turn holding the instruction, the
    numbered passages and the question. Training data for an answering model is built
    with this too (scripts/make_rag_sft.py), so it learns the prompt it will be given."""
    body = "\n\n".join(s.passage() for s in sources)
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question}"}]


def _render(tokenizer: Tokenizer, question: str, sources: list[Source]) -> list[int]:
    text = tokenizer.apply_chat_template(
        prompt_messages(question, sources), add_generation_prompt=True
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
    tokenizer: Tokenizer,
    question: str,
    hits: list[Hit],
    context: int,
    max_tokens: int | None = None,
) -> tuple[list[int], list[Source]]:
    """Prompt ids and the sources it numbers: prompt + max_tokens <= context, or with
    max_tokens None, prompt + answer_tokens(context, prompt, None) <= context."""
    if not question.strip():
        raise RagError("the question is empty")
    bare = len(_render(tokenizer, question, []))
    if max_tokens is None:
        room = context - bare
        if room < 1:
            raise RagError(
                f"the question alone makes a {bare}-token prompt, which fills the model's "
                f"{context}-token context; ask a shorter question"
            )
        # passages first: an answer that cites them is short, and a small context must
        # still show some (the answer then gets what they leave, up to RAG_MAX_TOKENS)
        max_tokens = min(RAG_MAX_TOKENS, max(1, room // 4))
    budget = context - max_tokens - bare
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
            flatten(hit.text),
            share - len(tokenizer.encode(prefix, add_special_tokens=False)) - 2,
        )
        candidate = sources + [Source(n, hit, text)]
        ids = _render(tokenizer, question, candidate)
        if len(ids) + max_tokens > context:
            break
        sources = candidate
        budget = context - max_tokens - len(ids)
    return _render(tokenizer, question, sources), sources


def answer_tokens(context: int, prompt_tokens: int, max_tokens: int | None) -> int:
    """The answer's length: max_tokens as asked, or when None the default, RAG_MAX_TOKENS
    or what the prompt leaves of the context, whichever is less."""
    if max_tokens is not None:
        return max_tokens
    return default_max_tokens(RAG_MAX_TOKENS, context, prompt_tokens)


def stream_answer(
    engine: Engine,
    question: str,
    hits: list[Hit],
    params: SamplingParams,
    default_length: bool = False,
) -> tuple[list[Source], Iterator[str]]:
    """The numbered sources and an iterator of answer text pieces (greedy by default).
    default_length: the answer gets the default length (answer_tokens), not
    params.max_tokens. The engine must be running (`start()`) or is driven by the
    iterator itself."""
    asked = None if default_length else params.max_tokens
    ids, sources = build_prompt(engine.tokenizer, question, hits, engine.max_context, asked)
    length = answer_tokens(engine.max_context, len(ids), asked)
    params = dataclasses.replace(params, max_tokens=length)
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
