"""falconet.rag: which files rag indexes and their hashes, chunking (invariants with the
real embedder tokenizer) and the offline all-MiniLM-L6-v2 embedder. Reading a file
(formats, encodings, hostile files) is the shared reader's: tests/test_documents.py."""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest

from falconet import documents
from falconet.documents import Document
from falconet.errors import LoaderError, RagError
from falconet.rag.chunking import Chunk, chunk_document, markdown_headings
from falconet.rag.embed import SentenceTransformerEmbedder, default_embedder, packaged_model_path
from falconet.rag.loaders import (
    SUPPORTED_SUFFIXES,
    file_sha256,
    find_documents,
    load_document,
    text_sha256,
)
from tests.test_documents import make_pdf


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


WORDS = ["falcon", "model", "runs", "on", "private", "machine", "data", "local", "index", "search",
         "answer", "question", "passage", "engine", "memory", "token", "cache", "document",
         "section", "page", "river", "mountain", "winter", "library"]  # fmt: skip


def prose(rng: random.Random, sentences: int) -> str:
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(sentences)
    )


def check_invariants(doc: Document, chunks: list[Chunk], count, max_tokens: int) -> None:
    assert chunks, "a non-empty document has chunks"
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text)
    for c in chunks:
        assert c.text == doc.text[c.start : c.end]
        assert c.start < c.end
        assert count(c.text) <= max_tokens
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start <= a.end < b.end  # covered, progressing, no gaps


# ------------------------------------------------------------------------------ loaders


def test_rag_indexes_these_files(tmp_path):
    assert SUPPORTED_SUFFIXES == (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
    (tmp_path / "notes.rst").write_text("Read by train; rag does not index it.\n")
    refused = r"notes\.rst: unsupported file \(type \.rst\); supported: \.txt, \.md, \.markdown, "
    with pytest.raises(LoaderError, match=refused + r"\.html, \.htm, \.pdf$"):
        load_document(tmp_path / "notes.rst")
    assert (
        documents.load_document(tmp_path / "notes.rst").text
        == "Read by train; rag does not index it.\n"
    )
    # The walk: sorted, hidden entries and other types left out, symlinks resolved (one may
    # point out of the folder: the server checks where each resolves).
    outside = tmp_path / "outside.md"
    outside.write_text("elsewhere")
    root = tmp_path / "root"
    (root / "sub" / ".git").mkdir(parents=True)
    for rel in ("b.txt", "sub/a.pdf", "sub/.git/config.txt", ".draft.md", "c.rst"):
        (root / rel).write_text("x")
    (root / "link.md").symlink_to(outside)
    assert find_documents(root) == [
        (root / "b.txt").resolve(),
        outside.resolve(),
        (root / "sub" / "a.pdf").resolve(),
    ]


def test_hostile_long_line(tmp_path, embedder):
    (tmp_path / "blob.txt").write_text("Q" * (2 * 2**20))  # 2 MB, one line, no spaces
    doc = load_document(tmp_path / "blob.txt")
    assert len(doc.text) == 2 * 2**20
    chunks = chunk_document(doc, embedder.count_tokens)
    check_invariants(doc, chunks, embedder.count_tokens, 200)
    assert max(len(c.text) for c in chunks) <= 200 * 16  # one [UNK] token is no excuse


def test_hashes(tmp_path):
    data = "héllo\n".encode() * 100_000
    (tmp_path / "h.txt").write_bytes(data)
    assert file_sha256(tmp_path / "h.txt") == hashlib.sha256(data).hexdigest()
    assert text_sha256("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert len(text_sha256("")) == 64
    with pytest.raises(LoaderError, match=r"gone\.txt cannot be read"):
        file_sha256(tmp_path / "gone.txt")


# ----------------------------------------------------------------------------- chunking


def markdown_doc(seed: int = 0) -> Document:
    rng = random.Random(seed)
    parts = ["# Guide\n\nA short introduction.\n"]
    for title in ("Install", "Configure", "Run"):
        parts.append(f"## {title}\n")
        parts.extend(prose(rng, rng.randint(2, 5)) + "\n" for _ in range(5))
    parts.append("```\n# not a heading, a shell comment\nmake test\n```\n")
    parts.append(prose(rng, 3) + "\n")
    return Document("/docs/guide.md", "\n".join(parts))


def test_chunk_invariants_and_determinism(embedder):
    doc = markdown_doc()
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=80, overlap_tokens=20)
    check_invariants(doc, chunks, embedder.count_tokens, 80)
    assert len(chunks) > 5
    assert chunks == chunk_document(doc, embedder.count_tokens, max_tokens=80, overlap_tokens=20)
    again = Document(doc.source, doc.text)
    assert chunks == chunk_document(again, embedder.count_tokens, 80, 20)


def test_chunk_sections(embedder):
    doc = markdown_doc()
    assert [t for _, t in markdown_headings(doc.text)] == ["Guide", "Install", "Configure", "Run"]
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=80, overlap_tokens=20)
    headings = markdown_headings(doc.text)
    for c in chunks:
        expected = [t for offset, t in headings if offset <= c.start][-1]
        assert c.section == expected and c.page is None
    # An overlap never reaches back across a heading into the previous section.
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert not any(b.start < offset <= a.end for offset, _ in headings)
    assert {c.section for c in chunks} == {"Guide", "Install", "Configure", "Run"}
    setext = "---\ntitle: front matter\n---\n\nTitle\n=====\n\nText.\n\nPart two\n---\n\nMore.\n"
    assert markdown_headings(setext) == (
        (setext.index("Title"), "Title"),
        (setext.index("Part two"), "Part two"),
    )
    tricky = "# C# and F#\n\n```python\n# no\n```js\n# still code\n```\n## Closed ##\n"
    assert [t for _, t in markdown_headings(tricky)] == ["C# and F#", "Closed"]
    no_headings = Document("/x.txt", "# not a heading in plain text\n\nbody", headings=())
    assert [c.section for c in chunk_document(no_headings, embedder.count_tokens)] == [None]


def test_chunk_overlap(embedder):
    rng = random.Random(3)
    doc = Document("/o.txt", prose(rng, 60), headings=())  # one paragraph, no headings
    count = embedder.count_tokens
    chunks = chunk_document(doc, count, max_tokens=100, overlap_tokens=30)
    check_invariants(doc, chunks, count, 100)
    for a, b in zip(chunks, chunks[1:], strict=False):
        shared = doc.text[b.start : a.end]
        assert 0 < count(shared) <= 30
        assert doc.text[b.start - 2 : b.start] == ". "  # the overlap starts at a sentence
    without = chunk_document(doc, count, max_tokens=100, overlap_tokens=0)
    check_invariants(doc, without, count, 100)
    assert all(a.end == b.start for a, b in zip(without, without[1:], strict=False))
    assert len(without) < len(chunks)


def test_chunk_overlap_falls_back_to_words(embedder):
    sentence = " ".join(WORDS * 3)  # one long sentence, no sentence boundary inside
    doc = Document("/w.txt", sentence, headings=())
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=50, overlap_tokens=10)
    check_invariants(doc, chunks, embedder.count_tokens, 50)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert 0 < embedder.count_tokens(doc.text[b.start : a.end]) <= 10
        assert doc.text[b.start - 1] == " "  # cut at a word


def test_chunk_prefers_paragraph_boundaries(embedder):
    rng = random.Random(5)
    paragraphs = [prose(rng, 3) for _ in range(30)]  # ~40-60 tokens each
    doc = Document("/p.txt", "\n\n".join(paragraphs) + "\n", headings=())
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=200, overlap_tokens=40)
    check_invariants(doc, chunks, embedder.count_tokens, 200)
    for c in chunks[:-1]:
        assert c.text.endswith("\n\n"), c.text[-40:]
        assert embedder.count_tokens(c.text) >= 100


def test_chunk_pdf_pages(tmp_path, embedder):
    rng = random.Random(7)
    pages = ["\n".join(prose(rng, 1) for _ in range(8)) for _ in range(3)]
    (tmp_path / "book.pdf").write_bytes(make_pdf(pages))
    doc = load_document(tmp_path / "book.pdf")
    assert len(doc.pages) == 3 and doc.pages[0] == 0
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=60, overlap_tokens=10)
    check_invariants(doc, chunks, embedder.count_tokens, 60)
    for c in chunks:
        assert doc.pages[c.page - 1] <= c.start
        assert c.page == len(doc.pages) or c.start < doc.pages[c.page]
        assert c.section is None
    assert {c.page for c in chunks} == {1, 2, 3}


def test_chunk_html_sections(tmp_path, embedder):
    rng = random.Random(11)
    body = "".join(f"<h2>Part {i}</h2>" + "<p>" + prose(rng, 6) + "</p>" for i in range(4))
    (tmp_path / "s.html").write_text(f"<html><body><h1>Book</h1><p>Intro.</p>{body}</body></html>")
    doc = load_document(tmp_path / "s.html")
    chunks = chunk_document(doc, embedder.count_tokens, max_tokens=60, overlap_tokens=10)
    check_invariants(doc, chunks, embedder.count_tokens, 60)
    for c in chunks:
        # The text a chunk starts in belongs to its section's heading.
        assert c.section == [t for o, t in doc.headings if o <= c.start][-1]
    assert {c.section for c in chunks} >= {f"Part {i}" for i in range(4)}


def test_chunk_long_words_and_lines(embedder):
    count = embedder.count_tokens
    text = "start " + "ab.cd/" * 2000 + " middle " + "z" * 10_000 + "\n" + "tail words " * 300
    doc = Document("/h.txt", text, headings=())
    chunks = chunk_document(doc, count, max_tokens=64, overlap_tokens=8)
    check_invariants(doc, chunks, count, 64)
    assert max(len(c.text) for c in chunks) <= 64 * 16


def random_document(rng: random.Random) -> Document:
    """Paragraphs, headings, lists, code, long tokens, odd whitespace and non-Latin text."""
    blocks = []
    for _ in range(rng.randint(1, 25)):
        kind = rng.random()
        if kind < 0.15:
            blocks.append("#" * rng.randint(1, 3) + " " + prose(rng, 1)[:30])
        elif kind < 0.25:
            blocks.append("\n".join("- " + prose(rng, 1) for _ in range(rng.randint(1, 6))))
        elif kind < 0.3:
            blocks.append(rng.choice(["x" * rng.randint(50, 5000), "東京は日本の首都です。" * 40]))
        elif kind < 0.35:
            blocks.append("\t \n  \n" + " " * rng.randint(0, 9))
        else:
            blocks.append(prose(rng, rng.randint(1, 12)))
    return Document("/fuzz.md", rng.choice(["", "\n", "  "]) + "\n\n".join(blocks))


@pytest.mark.parametrize("seed", range(12))
def test_chunk_random_documents(embedder, seed):
    rng = random.Random(seed)
    doc = random_document(rng)
    if not doc.text.strip():
        assert chunk_document(doc, embedder.count_tokens) == []
        return
    max_tokens = rng.choice([8, 32, 64, 200])
    overlap = rng.choice([0, max_tokens // 5, max_tokens - 1])
    for count in (embedder.count_tokens, len):  # WordPiece and a character "tokenizer"
        chunks = chunk_document(doc, count, max_tokens, overlap)
        check_invariants(doc, chunks, count, max_tokens)
        assert chunks == chunk_document(doc, count, max_tokens, overlap)


def test_chunk_edge_cases(embedder):
    count = embedder.count_tokens
    assert chunk_document(Document("/e.txt", ""), count) == []
    assert chunk_document(Document("/e.txt", " \n\n "), count) == []
    tiny = Document("/t.md", "\n\n  Just one line.  \n")
    assert chunk_document(tiny, count) == [Chunk(tiny.text, 0, len(tiny.text), None, None)]
    with pytest.raises(ValueError):
        chunk_document(tiny, count, max_tokens=0)
    with pytest.raises(ValueError):
        chunk_document(tiny, count, max_tokens=10, overlap_tokens=10)


# ----------------------------------------------------------------------------- embedder


def test_embedder_identity(embedder, tmp_path):
    assert embedder.dim == 384
    assert re.fullmatch(
        r"sentence-transformers/all-MiniLM-L6-v2@[0-9a-f]{12};normalize", embedder.id
    )
    assert default_embedder() is embedder  # cached per process
    again = SentenceTransformerEmbedder(path=packaged_model_path(), batch_size=3)
    assert again.id == embedder.id and again.dim == 384
    with pytest.raises(RagError, match="not a sentence-transformers model folder"):
        SentenceTransformerEmbedder(path=tmp_path)
    # Another folder holding the same weights: named by its folder, same weights hash.
    mine = tmp_path / "my-minilm"
    mine.mkdir()
    for item in packaged_model_path().iterdir():
        (mine / item.name).symlink_to(item)
    custom = SentenceTransformerEmbedder(path=mine)
    assert custom.id == "my-minilm@" + embedder.id.split("@")[1]


def test_embed_vectors(embedder):
    texts = [
        "The cat sat on the mat.",
        "A kitten was sitting on the rug.",
        "Quarterly revenue grew by eight percent.",
        "",
        "Falcon " * 400,  # longer than the model's 256-token window: truncated, not an error
    ]
    vectors = embedder.embed(texts)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    one_by_one = np.concatenate([embedder.embed([t]) for t in texts])
    assert np.allclose(vectors, one_by_one, atol=1e-5)
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_count_tokens(embedder):
    assert embedder.count_tokens("") == 0
    assert embedder.count_tokens("hello world") == 2  # no [CLS]/[SEP]
    long = "word " * 1000
    assert embedder.count_tokens(long) == 1000  # not truncated like tokenizer.json's 128
    hf = embedder._model.tokenizer
    text = "Naïve café, 東京 and emoji 🦅 (tokenised the same)."
    assert embedder.count_tokens(text) == len(hf(text, add_special_tokens=False)["input_ids"])
