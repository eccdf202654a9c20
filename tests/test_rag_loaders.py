"""falconet.rag: loaders (each format, encodings, hostile files), chunking (invariants with
the real embedder tokenizer) and the offline all-MiniLM-L6-v2 embedder."""

from __future__ import annotations

import hashlib
import io
import random
import re

import numpy as np
import pytest

from falconet.errors import LoaderError, RagError
from falconet.rag.chunking import Chunk, chunk_document, markdown_headings
from falconet.rag.embed import SentenceTransformerEmbedder, default_embedder, packaged_model_path
from falconet.rag.loaders import (
    DEFAULT_MAX_BYTES,
    SUPPORTED_SUFFIXES,
    Document,
    file_sha256,
    load_document,
    text_sha256,
)


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one Helvetica text line per line of each page's text."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        ops = ["BT /F1 12 Tf 14 TL 72 720 Td"]
        for line in text.split("\n"):
            esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({esc}) Tj T*")
        stream = "\n".join([*ops, "ET"]).encode("latin-1")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for k, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (k, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objs) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


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


def test_load_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text.\r\nSecond line.\n")
    (tmp_path / "b.md").write_text("# Title\n\nSome *markdown*.\n")
    (tmp_path / "c.markdown").write_text("Just text.\n")
    (tmp_path / "d.HTM").write_text("<p>Upper-case suffix</p>")
    (tmp_path / "e.pdf").write_bytes(make_pdf(["First page.", "Second (page) here."]))

    txt = load_document(tmp_path / "a.txt")
    assert txt.text == "Plain text.\nSecond line.\n"  # CRLF normalised
    assert txt.source == str((tmp_path / "a.txt").resolve()) and txt.pages == ()
    assert load_document(tmp_path / "b.md").text == "# Title\n\nSome *markdown*.\n"
    assert load_document(str(tmp_path / "c.markdown")).text == "Just text.\n"
    assert load_document(tmp_path / "d.HTM").text == "Upper-case suffix"
    pdf = load_document(tmp_path / "e.pdf")
    assert pdf.text == "First page.\n\nSecond (page) here."
    assert pdf.pages == (0, len("First page.\n\n"))
    assert pdf.text[pdf.pages[1] :].startswith("Second")
    assert SUPPORTED_SUFFIXES == (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
    assert DEFAULT_MAX_BYTES == 50 * 2**20


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\xef\xbb\xbfBOM caf\xc3\xa9", "BOM café"),
        ("UTF-16 caf\u00e9 \u6771\u4eac".encode("utf-16"), "UTF-16 café 東京"),
        ("big-endian \u00e9".encode("utf-16-be").join([b"\xfe\xff", b""]), "big-endian é"),
        ("UTF-32 \u00e9".encode("utf-32"), "UTF-32 é"),
        ("cp1252 caf\u00e9 \u201cquoted\u201d \u20ac5".encode("cp1252"), "cp1252 café “quoted” €5"),
        ("plain UTF-8 na\u00efve \U0001f985".encode(), "plain UTF-8 naïve 🦅"),
        ("no BOM caf\u00e9\r\n".encode("utf-16-le"), "no BOM café\n"),
        ("no BOM, big-endian".encode("utf-16-be"), "no BOM, big-endian"),
    ],
    ids=[
        "utf8-bom",
        "utf16-le-bom",
        "utf16-be-bom",
        "utf32-bom",
        "cp1252",
        "utf8",
        "utf16-le",
        "utf16-be",
    ],  # fmt: skip
)
def test_text_encodings(tmp_path, data, expected):
    (tmp_path / "t.txt").write_bytes(data)
    assert load_document(tmp_path / "t.txt").text == expected


def test_utf8_with_a_few_invalid_bytes_is_utf8(tmp_path):
    good = "Café crème, naïve façade. " * 20
    data = good.encode() + b"\xff\xfe stray \x80 bytes " + good.encode()
    (tmp_path / "mixed.md").write_bytes(data)
    text = load_document(tmp_path / "mixed.md").text
    assert text.count("\ufffd") == 3  # replaced, and the rest is not read as cp1252 mojibake
    assert text.startswith("Café crème") and "Ã" not in text


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
        random.Random(0).randbytes(4096),
        bytes(range(1, 9)) * 100,  # control characters without NULs
        b"\x00\x01\x02\x03" * 64,  # NULs in every other byte, but in both halves
    ],
    ids=["png", "random", "control", "nul-pattern"],
)
def test_binary_content_is_rejected(tmp_path, data):
    path = tmp_path / "photo.txt"
    path.write_bytes(data)
    with pytest.raises(LoaderError, match=r"photo\.txt looks binary"):
        load_document(path)


def test_bad_bom_is_rejected(tmp_path):
    (tmp_path / "odd.txt").write_bytes(b"\xff\xfe" + b"a")  # UTF-16 BOM, odd length
    with pytest.raises(LoaderError, match=r"odd\.txt .*byte-order mark"):
        load_document(tmp_path / "odd.txt")


def test_oversized_file(tmp_path):
    path = tmp_path / "big.pdf"
    path.write_bytes(b"x" * 3000)
    with pytest.raises(LoaderError) as e:
        load_document(path, max_bytes=1024)
    assert str(e.value) == f"{path} is 2.9 KB, over the 1 KB limit; raise --max-file-mb"
    path.write_bytes(b"x" * 10)
    with pytest.raises(LoaderError, match=r"10 bytes, over the 8 bytes limit"):
        load_document(path, max_bytes=8)
    (tmp_path / "ok.txt").write_bytes(b"x" * 1024)
    assert load_document(tmp_path / "ok.txt", max_bytes=1024).text == "x" * 1024


def test_missing_unreadable_and_unsupported(tmp_path):
    with pytest.raises(LoaderError, match=r"nope\.txt does not exist"):
        load_document(tmp_path / "nope.txt")
    (tmp_path / "dir.md").mkdir()
    with pytest.raises(LoaderError, match=r"dir\.md is a directory"):
        load_document(tmp_path / "dir.md")
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(LoaderError, match=r"report\.docx: unsupported file \(type \.docx\)"):
        load_document(tmp_path / "report.docx")
    (tmp_path / "README").write_text("hi")
    with pytest.raises(LoaderError, match=r"README: unsupported file \(no file extension\)"):
        load_document(tmp_path / "README")
    with pytest.raises(LoaderError, match=r"cannot be read"):
        load_document(str(tmp_path / "nul\x00.txt"))
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    with pytest.raises(LoaderError, match=r"loop\.txt cannot be read"):
        load_document(tmp_path / "loop.txt")


def test_broken_pdfs(tmp_path):
    whole = make_pdf(["Some text on a page."])
    cases = {
        "truncated.pdf": whole[: len(whole) // 2],
        "garbage.pdf": b"%PDF-1.4\n" + random.Random(1).randbytes(500),
        "text.pdf": b"this is not a PDF",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LoaderError, match=re.escape(name) + " is not a readable PDF"):
            load_document(tmp_path / name)


def test_encrypted_pdf(tmp_path):
    import pypdf

    (tmp_path / "plain.pdf").write_bytes(make_pdf(["Secret page."]))
    writer = pypdf.PdfWriter(clone_from=tmp_path / "plain.pdf")
    writer.encrypt("hunter2", algorithm="RC4-128")
    writer.write(tmp_path / "locked.pdf")
    with pytest.raises(LoaderError, match=r"locked\.pdf is an encrypted .*decrypt it first"):
        load_document(tmp_path / "locked.pdf")
    # Encrypted with an empty user password (owner restrictions only) opens as usual.
    writer = pypdf.PdfWriter(clone_from=tmp_path / "plain.pdf")
    writer.encrypt("", owner_password="owner", algorithm="RC4-128")
    writer.write(tmp_path / "restricted.pdf")
    assert load_document(tmp_path / "restricted.pdf").text == "Secret page."


def test_empty_documents(tmp_path):
    import pypdf

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_text(" \n\n\t\n")
    (tmp_path / "scripts.html").write_text("<html><script>alert(1)</script><p> </p></html>")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(200, 200)
    writer.write(tmp_path / "scan.pdf")
    for name in ("empty.txt", "blank.md", "scripts.html"):
        with pytest.raises(LoaderError, match=re.escape(name) + " is empty"):
            load_document(tmp_path / name)
    with pytest.raises(LoaderError, match=r"scan\.pdf has no extractable text"):
        load_document(tmp_path / "scan.pdf")


def test_html_visible_text_and_headings(tmp_path):
    html = """<!DOCTYPE html><html><head><title>Not shown</title>
    <style>p { color: red }</style><script>var hidden = "<p>no</p>";</script></head>
    <body><noscript>Enable JS</noscript><template><p>templated</p></template>
    <h1>Getting   <em>started</em></h1>
    <p>Falcon runs <b>on your <i>own</i></b> machine &amp; keeps&nbsp;data local.</p>
    <div><div><span>Nested</span> <span>spans</span></div></div>
    <ul><li>one</li><li>two</li></ul>
    <h2>Next step</h2><p>Line one<br>line two</p>
    <table><tr><td>a</td><td>b</td></tr></table>
    <pre>  keep
    this</pre><!-- a comment --><p>End.</p></body></html>"""
    (tmp_path / "page.html").write_text(html)
    doc = load_document(tmp_path / "page.html")
    assert doc.text == (
        "Getting started\n\n"
        "Falcon runs on your own machine & keeps\u00a0data local.\n\n"
        "Nested spans\n\none\ntwo\n\nNext step\n\nLine one\nline two\n\na b\n\n"
        "  keep\n    this\n\nEnd."
    )
    for hidden in ("Not shown", "color", "hidden", "Enable JS", "templated", "comment"):
        assert hidden not in doc.text
    assert doc.headings == ((0, "Getting started"), (doc.text.index("Next step"), "Next step"))


def test_html_charset_declaration(tmp_path):
    html = '<meta charset="iso-8859-7"><p>\u0391\u03b8\u03ae\u03bd\u03b1</p>'
    (tmp_path / "greek.html").write_bytes(html.encode("iso-8859-7"))
    assert load_document(tmp_path / "greek.html").text == "Αθήνα"


def test_hostile_html_is_linear(tmp_path):
    depth = 50_000
    html = "<div><span>" * depth + "deep" + "</span></div>" * (depth // 2)  # half unclosed
    html += "<h3>" * 1000 + "<script>" + "<p>never closed" * 1000
    (tmp_path / "deep.html").write_text(html)
    doc = load_document(tmp_path / "deep.html")  # no recursion, no per-tag stack walks
    assert doc.text == "deep"


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
