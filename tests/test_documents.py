"""falconet.documents, the reader every face shares: each format, encodings, hostile
files, the folder walk; and that `train` and `rag` get the same text from the same file."""

from __future__ import annotations

import io
import os
import random
import re

import pytest

from falconet.documents import (
    DEFAULT_MAX_BYTES,
    DOCUMENT_SUFFIXES,
    find_documents,
    load_document,
    read_text,
)
from falconet.errors import LoaderError
from falconet.rag import loaders as rag_loaders
from falconet.train.data import read_corpus


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
    assert DOCUMENT_SUFFIXES == (
        ".txt",
        ".text",
        ".rst",
        ".md",
        ".markdown",
        ".html",
        ".htm",
        ".pdf",
    )
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


def test_plain_text_kinds_and_no_size_limit(tmp_path):
    (tmp_path / "guide.rst").write_text("Title\n=====\n\nBody.\r\n")
    doc = load_document(tmp_path / "guide.rst")
    assert doc.text == "Title\n=====\n\nBody.\n" and doc.headings == ()  # plain: none known
    (tmp_path / "big.txt").write_bytes(b"y" * 3000)
    assert load_document(tmp_path / "big.txt", max_bytes=None).text == "y" * 3000
    with pytest.raises(LoaderError, match=r"big\.txt is 2\.9 KB, over the 1 KB limit"):
        read_text(tmp_path / "big.txt", max_bytes=1024)
    (tmp_path / "data.csv").write_bytes("a;b\r\ncaf\u00e9;2\r\n".encode("cp1252"))
    assert read_text(tmp_path / "data.csv") == "a;b\ncafé;2\n"  # any type, decoded as .txt
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(LoaderError, match=r"blank\.jsonl is empty"):
        read_text(tmp_path / "blank.jsonl")


def test_html_without_a_head_end_tag(tmp_path):
    # </head> may be left out (browsers close the head at the first body content).
    html = "<html><head><title>Tab title</title><meta charset=utf-8><body><h1>Hi</h1><p>Body.</p>"
    (tmp_path / "p.html").write_text(html)
    doc = load_document(tmp_path / "p.html")
    assert doc.text == "Hi\n\nBody." and doc.headings == ((0, "Hi"),) and doc.warnings == ()


def test_unclosed_hidden_element_warns(tmp_path):
    (tmp_path / "cut.html").write_text("<p>Shown</p><script>var a = 1;<p>lost text</p>")
    doc = load_document(tmp_path / "cut.html")
    assert doc.text == "Shown"
    assert doc.warnings == (
        f"{tmp_path / 'cut.html'}: an unclosed <script> hides the rest of the page",
    )
    (tmp_path / "svg.html").write_text("<p>Shown</p><svg><style>x</style><p>lost</p>")
    assert (
        load_document(tmp_path / "svg.html")
        .warnings[0]
        .endswith("unclosed <svg> hides the rest of the page")
    )


def test_find_documents(tmp_path):
    names = "b.txt a/z.md a/b/c.html A.TXT notes.docx .hidden.txt .git/x.txt a/.cache/y.md c.pdf"
    for rel in names.split():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("text")
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "gone.md").symlink_to(tmp_path / "nowhere.md")
    (tmp_path / "linked").symlink_to(tmp_path / "a", target_is_directory=True)  # not followed
    found = find_documents(tmp_path, (".txt", ".md", ".html"))
    # Sorted by path (a folder's files and its subfolders' in one order), hidden entries and
    # other types left out; a broken link and a FIFO kept for the reader to refuse by name.
    expected = ["A.TXT", "a/b/c.html", "a/z.md", "b.txt", "gone.md", "pipe.txt"]
    assert [f.relative_to(tmp_path).as_posix() for f in found] == expected
    with pytest.raises(LoaderError, match=r"pipe\.txt is not a regular file"):
        load_document(tmp_path / "pipe.txt")
    with pytest.raises(LoaderError, match=r"gone\.md does not exist"):
        load_document(tmp_path / "gone.md")
    assert find_documents(tmp_path / "a" / "b", (".pdf",)) == []


# -------------------------------------------------------- the same text for train and rag

PAGE = """<!DOCTYPE html><html><head><title>Tab</title><style>p { color: red }</style>
<script>var hidden = "<p>no</p>";</script></head><body>
<h1>Getting started</h1><p>Falcon runs on <b>your</b> machine &amp; keeps data local.</p>
<h2>Next</h2><ul><li>one</li><li>two</li></ul><noscript>Enable JS</noscript></body></html>"""
GOOD_UTF8 = "Café crème, naïve façade. " * 20

PAGE_TEXT = "Getting started\n\nFalcon runs on your machine & keeps data local.\n\nNext\n\none\ntwo"
GREEK = '<meta charset="iso-8859-7"><p>\u0391\u03b8\u03ae\u03bd\u03b1</p>'
SAME_TEXT = {  # file name: (bytes, the text both faces read)
    "cp1252.txt": (
        "caf\u00e9 \u201cquoted\u201d \u20ac5\r\n".encode("cp1252"),
        "café “quoted” €5\n",
    ),
    "utf16-bom.txt": ("caf\u00e9 \u6771\u4eac\r\nline two".encode("utf-16"), "café 東京\nline two"),
    "utf16-no-bom.md": (
        "# Title\n\nno BOM caf\u00e9".encode("utf-16-le"),
        "# Title\n\nno BOM café",
    ),
    "utf8-bom.md": (b"\xef\xbb\xbf# BOM caf\xc3\xa9\n", "# BOM café\n"),
    "mostly-utf8.txt": (
        GOOD_UTF8.encode() + b"\xff bad " + GOOD_UTF8.encode(),
        GOOD_UTF8 + "\ufffd bad " + GOOD_UTF8,
    ),
    "page.html": (PAGE.encode(), PAGE_TEXT),
    "page-utf16.htm": (PAGE.encode("utf-16"), PAGE_TEXT),
    "greek.html": (GREEK.encode("iso-8859-7"), "Αθήνα"),
}


@pytest.mark.parametrize("name", sorted(SAME_TEXT))
def test_train_and_rag_read_the_same_text(tmp_path, name):
    data, expected = SAME_TEXT[name]
    (tmp_path / name).write_bytes(data)
    assert rag_loaders.load_document(tmp_path / name).text == expected
    assert read_corpus([tmp_path / name]).documents == [expected]  # the file named
    assert read_corpus([tmp_path]).documents == [expected]  # found by the folder walk
