"""Answers with citations: the numbered-passage prompt fits the context, sources match
the prompt's numbers, and the answer streams through the engine."""

from __future__ import annotations

import pytest

import falconet
from falconet.engine import Engine
from falconet.errors import RagError
from falconet.rag.answer import build_prompt, stream_answer
from falconet.rag.store import Hit
from falconet.sampling import SamplingParams

VERSES = [
    "And Cain talked with Abel his brother: and it came to pass, when they were in the "
    "field, that Cain rose up against Abel his brother, and slew him.",
    "And the LORD said unto Cain, Where is Abel thy brother? And he said, I know not: "
    "Am I my brother's keeper?",
    "And Adam knew his wife again; and she bare a son, and called his name Seth.",
]


def _hit(i: int, text: str) -> Hit:
    return Hit(f"c{i}", f"d{i}", f"/docs/genesis-{i}.txt", i, text, 0, len(text),
               "Genesis 4" if i % 2 else None, None, 1.0 / (i + 1))  # fmt: skip


@pytest.fixture(scope="module")
def llm():
    return falconet.load()


def test_prompt_fits_the_context_and_numbers_the_sources(llm):
    long = " ".join(VERSES * 6)  # each passage alone would overflow a 256-token context
    hits = [_hit(i, long) for i in range(5)]
    ids, sources = build_prompt(llm.tokenizer, "Who killed Abel?", hits, 256, 40)
    assert len(ids) + 40 <= 256
    assert [s.number for s in sources] == list(range(1, len(sources) + 1))
    assert len(sources) >= 2 and [s.hit.chunk_id for s in sources] == [
        f"c{i}" for i in range(len(sources))
    ]
    prompt = llm.tokenizer.decode(ids)
    for s in sources:
        assert f"[{s.number}] ({s.label()}) {s.text}" in prompt
        assert s.text.endswith(" ...")  # cut to fit, at a word boundary
    assert "Question: Who killed Abel?" in prompt and prompt.rstrip().endswith("Falcon:")


def test_short_passages_are_kept_whole_best_first(llm):
    hits = [_hit(i, v) for i, v in enumerate(VERSES)]
    ids, sources = build_prompt(llm.tokenizer, "Who killed Abel?", hits, 256, 32)
    assert [s.text for s in sources] == VERSES
    assert sources[1].label() == "genesis-1.txt, Genesis 4"


def test_no_room_is_a_clear_error(llm):
    with pytest.raises(RagError, match="no room"):
        build_prompt(llm.tokenizer, "why " * 300, [_hit(0, VERSES[0])], 256, 32)
    with pytest.raises(RagError, match="empty"):
        build_prompt(llm.tokenizer, "  ", [_hit(0, VERSES[0])], 256, 32)


def test_answer_streams_through_the_engine(llm):
    engine = Engine.from_llm(llm)
    params = SamplingParams(max_tokens=24)
    hits = [_hit(i, v) for i, v in enumerate(VERSES)]
    sources, pieces = stream_answer(engine, "Who killed Abel?", hits, params)
    text = "".join(pieces)
    ids, same = build_prompt(llm.tokenizer, "Who killed Abel?", hits, engine.max_context, 24)
    assert same == sources and len(sources) == 3
    assert text == engine.generate([ids], [params])[0].text and text.strip()
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0
