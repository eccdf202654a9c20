"""Files -> text, for every face that reads documents (`rag` ingestion, `train` corpora).

This module owns reading a document, so that the same file gives the same text whichever
face reads it:

- the folder walk (`find_documents`): sorted paths, a suffix filter, hidden entries skipped;
- reading a file (`load_document`, `read_text`, `open_regular_file`): a regular file
  only, checked before it is opened (a FIFO would block the open, a device never end the
  read), its size checked against the limit before a byte is read and the read capped;
- decoding: a byte-order mark, else UTF-16 by its NUL pattern, else (HTML) a declared
  charset, else UTF-8 (a few bad bytes become U+FFFD), else cp1252; bytes that look binary
  are refused;
- HTML's visible text (`html_to_text`, one parser) and a PDF's text, page by page.

Every failure is a `LoaderError` whose message names the file and says what to do, so a
face reading a folder can skip the file with a warning and go on. Nothing here writes.

`Document.text` is what chunk offsets point into. Line ends are normalised to "\\n";
otherwise text and Markdown files are kept as they are, HTML is reduced to its visible
text (block elements become line breaks, headings their own paragraphs, recorded in
`Document.headings`), and a PDF is its pages' text joined by blank lines, with
`Document.pages` giving where each page starts.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import re
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO

from falconet.errors import LimitError, LoaderError

# How each kind of file is read; a face picks the suffixes it takes (rag: SUPPORTED_SUFFIXES).
PLAIN_TEXT_SUFFIXES = (".txt", ".text", ".rst")  # kept as is, no headings known
MARKDOWN_SUFFIXES = (".md", ".markdown")  # kept as is; chunking finds the '#' headings
HTML_SUFFIXES = (".html", ".htm")  # visible text, headings recorded
PDF_SUFFIXES = (".pdf",)  # pages' text, page starts recorded
DOCUMENT_SUFFIXES = PLAIN_TEXT_SUFFIXES + MARKDOWN_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
DEFAULT_MAX_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Document:
    source: str  # the file's resolved absolute path
    text: str  # the extracted text (visible text for HTML)
    # PDFs: char offset in `text` where page i+1 starts (pages[0] == 0); () otherwise
    pages: tuple[int, ...] = ()
    # (offset in `text`, heading text) of each heading, in order, where the loader knows
    # them (HTML h1-h6; () for PDFs and plain text). None: not known, so chunking looks for
    # Markdown headings ('# Title') in `text` itself.
    headings: tuple[tuple[int, str], ...] | None = None
    # What the reader noticed but did not refuse (an unclosed <script> hiding the rest of
    # a page), each naming the file; the face decides whether to show them.
    warnings: tuple[str, ...] = ()


def load_document(
    path: str | Path,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    suffixes: tuple[str, ...] = DOCUMENT_SUFFIXES,
) -> Document:
    """Read one file into a Document, or raise LoaderError naming it.

    `suffixes` are the kinds of file the caller takes (lower case, each in
    DOCUMENT_SUFFIXES); `max_bytes` None reads a file of any size."""
    name = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        kind = f"type {suffix}" if suffix else "no file extension"
        raise LoaderError(f"{name}: unsupported file ({kind}); supported: {', '.join(suffixes)}")
    data, source = _read_bytes(path, max_bytes)
    if suffix in PDF_SUFFIXES:
        return _load_pdf(name, source, data)
    text = _decode_text(name, data, sniff_html_charset=suffix in HTML_SUFFIXES)
    if suffix in HTML_SUFFIXES:
        page = _parse_html(text)
        warnings = ()
        if page.skip_depth:
            warnings = (f"{name}: an unclosed <{page.hidden_tag}> hides the rest of the page",)
        doc = Document(source, page.text, headings=tuple(page.headings), warnings=warnings)
    elif suffix in PLAIN_TEXT_SUFFIXES:
        doc = Document(source, text, headings=())
    else:  # Markdown: kept as is; chunking finds its '#' headings
        doc = Document(source, text)
    if not doc.text.strip():
        raise _empty(name)
    return doc


def read_text(path: str | Path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Any text file's text (JSONL, a file of unknown type), decoded as a .txt file is,
    line ends "\\n"; LoaderError if it cannot be read, looks binary or is blank."""
    data, _ = _read_bytes(path, max_bytes)
    text = _decode_text(str(path), data)
    if not text.strip():
        raise _empty(str(path))
    return text


def find_documents(
    folder: str | Path,
    suffixes: tuple[str, ...],
    on_error: Callable[[Path, str], None] | None = None,
) -> list[Path]:
    """The files under `folder` (recursively) whose lower-cased suffix is in `suffixes`,
    in sorted path order (so a corpus reads the same on every run), as `folder / ...`.

    Skipped, silently: hidden files and folders (a name starting with "."), such as .git,
    .venv and a RAG store's .falconet-rag; files of other types; symlinked folders (not
    followed, so a link cannot loop or lead the walk out of the tree). Subfolders that
    cannot be listed are skipped and passed to `on_error` (path, why). A matching name
    that is not a readable regular file (a broken link, a link loop, a FIFO, a socket, a
    device) is kept, so the reader refuses it with a reason the user sees."""
    folder = Path(folder)
    found = []

    def unlistable(e: OSError) -> None:
        if on_error is not None and e.filename is not None:
            on_error(Path(e.filename), f"cannot be listed ({e.strerror or e})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(suffixes)
        ]
    return sorted(found)


# ---------------------------------------------------------------------------- reading


def _human_size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KB"
    return f"{n} bytes"


def _human_limit(n: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _empty(name: str) -> LoaderError:
    return LoaderError(f"{name} is empty (no text in it)")


def _too_big(name: str, size: int, max_bytes: int) -> LimitError:
    return LimitError(
        f"{name} is {_human_size(size)}, over the {_human_limit(max_bytes)} limit", "max_file_mb"
    )


def _unreadable(name: str, e: OSError | ValueError) -> LoaderError:
    """The LoaderError for an OSError met while looking at or reading `name`."""
    if isinstance(e, FileNotFoundError):
        return LoaderError(f"{name} does not exist")
    if isinstance(e, PermissionError):
        return LoaderError(f"{name} cannot be read (permission denied)")
    if getattr(e, "errno", None) == errno.ELOOP:
        return LoaderError(f"{name} cannot be read: a symlink loop")
    reason = getattr(e, "strerror", None) or str(e)  # ValueError: a NUL in the path
    return LoaderError(f"{name} cannot be read: {reason}")


def _check_regular(name: str, info: os.stat_result, max_bytes: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise LoaderError(f"{name} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end it
        raise LoaderError(f"{name} is not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise _too_big(name, info.st_size, max_bytes)


def regular_file_stat(path: str | Path, max_bytes: int | None = None) -> os.stat_result:
    """`path`'s stat (symlinks followed) once it is known to be a regular file of at most
    `max_bytes`: nothing is opened, so a FIFO cannot block and a 4 GiB file is refused
    without a byte read. LoaderError (LimitError for the size) names the file."""
    name = str(path)
    try:
        info = os.stat(path)
    except (OSError, ValueError) as e:
        raise _unreadable(name, e) from None
    _check_regular(name, info, max_bytes)
    return info


def open_regular_file(path: str | Path, max_bytes: int | None = None) -> BinaryIO:
    """`path` opened for reading in binary, checked as `regular_file_stat` does before the
    open and again on the open file (it may have been swapped for a FIFO in between; the
    open does not block on one)."""
    name = str(path)
    regular_file_stat(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as e:
        raise _unreadable(name, e) from None
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(name, os.fstat(fd), max_bytes)
    except BaseException:
        f.close()
        raise
    return f


def _read_bytes(path: str | Path, max_bytes: int | None) -> tuple[bytes, str]:
    """The file's bytes and its resolved absolute path; size-checked before reading
    (`max_bytes` None: no limit)."""
    name = str(path)
    with open_regular_file(path, max_bytes) as f:
        try:  # one byte over the limit at most, if it grew since
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
            source = os.path.realpath(path)
        except OSError as e:
            raise _unreadable(name, e) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_big(name, len(data), max_bytes)
    return data, source


# --------------------------------------------------------------------------- decoding

_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters other than tab, newlines, form feed and vertical tab.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_INVALID_UTF8 = re.compile(r"[\udc80-\udcff]")  # bytes that surrogateescape kept aside
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
# A text with more control characters than this share is taken for binary data.
_MAX_CONTROL_SHARE = 0.01
# UTF-8 with at most this share of invalid bytes (and more valid non-ASCII characters than
# invalid bytes) is read as UTF-8 with U+FFFD for the bad bytes, not as cp1252 mojibake.
_MAX_INVALID_UTF8_SHARE = 0.01


def _decode_text(name: str, data: bytes, sniff_html_charset: bool = False) -> str:
    """Bytes -> str: BOM, else UTF-16 by its NUL pattern, else (HTML) a declared charset,
    else UTF-8, else cp1252.

    Raises LoaderError for bytes that look binary (NUL bytes, many control characters,
    undecodable in every candidate encoding)."""
    text = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise LoaderError(
                    f"{name} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()}; re-save it as UTF-8"
                ) from None
            text = text.lstrip("\ufeff")
            break
    if text is None and b"\x00" in data:
        text = _decode_utf16_without_bom(data)
        if text is None:
            raise LoaderError(f"{name} looks binary (it contains NUL bytes); not a text file")
    if text is None:
        text = _decode_without_bom(data, sniff_html_charset)
        if text is None:
            raise LoaderError(
                f"{name} looks binary (not decodable as UTF-8 or cp1252); not a text file"
            )
    bad = len(_CONTROL.findall(text))
    if bad > len(text) * _MAX_CONTROL_SHARE:
        raise LoaderError(
            f"{name} looks binary ({bad} control characters in {len(text)}); not a text file"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode_utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 text saved without a BOM: mostly-Latin text has a NUL in every other byte
    and none in the others. Binary data with NULs in both places is not tried."""
    if len(data) % 2:
        return None
    even, odd = data[0::2].count(0), data[1::2].count(0)
    half = len(data) // 2
    for nuls, other, encoding in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if other == 0 and nuls >= 0.3 * half:
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                return None
    return None


def _decode_without_bom(data: bytes, sniff_html_charset: bool) -> str | None:
    if sniff_html_charset and (m := _META_CHARSET.search(data[:4096])):
        try:
            encoding = codecs.lookup(m.group(1).decode("ascii")).name
            if encoding not in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
                return data.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong or unknown declaration: sniff as for any text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "surrogateescape")
    invalid = len(_INVALID_UTF8.findall(text))
    non_ascii = len(text) - len(text.encode("ascii", "ignore")) - invalid
    if invalid <= len(data) * _MAX_INVALID_UTF8_SHARE and non_ascii >= invalid:
        return _INVALID_UTF8.sub("\ufffd", text)  # mostly UTF-8 with a few bad bytes
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # cp1252 leaves 0x81 0x8d 0x8f 0x90 0x9d undefined
        return None


# ------------------------------------------------------------------------------- HTML

# Not <head>: its end tag may be left out, and a browser still shows the body after it;
# the only text a head holds is its <title>.
_SKIP = frozenset({"script", "style", "title", "template", "noscript", "svg", "math", "iframe"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# Elements after which the text starts a new paragraph (a blank line) or a new line.
_PARAGRAPH = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "aside",
        "header",
        "footer",
        "main",
        "nav",
        "blockquote",
        "pre",
        "ul",
        "ol",
        "dl",
        "table",
        "form",
        "fieldset",
        "figure",
        "figcaption",
        "details",
        "summary",
        "hr",
        "address",
        "body",
        "html",
    }  # fmt: skip
)
_LINE = frozenset({"br", "li", "dt", "dd", "tr", "caption", "option", "legend", "label"})
_CELL = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML's whitespace; &nbsp; is text


class _VisibleText(HTMLParser):
    """Collects visible text with HTML whitespace rules, in one pass and without recursion
    (so deeply nested or unclosed markup costs linear time and no stack)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.pending_break = 0  # newlines owed before the next text (0, 1 or 2)
        self.pending_space = False
        self.at_line_start = True
        self.skip_depth = 0
        self.hidden_tag = ""  # the outermost hidden element open (script, style, ...)
        self.pre_depth = 0
        self.in_heading = False
        self.heading_start = -1  # offset and index in `parts` of the heading's first text
        self.heading_part = 0
        self.headings: list[tuple[int, str]] = []

    def _break(self, newlines: int) -> None:
        self.pending_break = max(self.pending_break, newlines)
        self.pending_space = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP:
            if not self.skip_depth:
                self.hidden_tag = tag
            self.skip_depth += 1
        elif tag in _HEADINGS:
            self._end_heading()
            self._break(2)
            self.in_heading, self.heading_start = True, -1
        elif tag in _PARAGRAPH:
            self._break(2)
            self.pre_depth += tag == "pre"
        elif tag in _LINE:
            self._break(1)
        elif tag in _CELL and not self.at_line_start:
            self.pending_space = True

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag not in _SKIP:  # <br/>, <hr/>; a self-closed <script/> opens nothing
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _HEADINGS:
            self._end_heading()
            self._break(2)
        elif tag in _PARAGRAPH:
            self._break(2)
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)
        elif tag in _LINE and tag != "br":
            self._break(1)

    def _end_heading(self) -> None:
        if self.in_heading and self.heading_start >= 0:
            title = " ".join("".join(self.parts[self.heading_part :]).split())
            self.headings.append((self.heading_start, title))
        self.in_heading = False

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = _HTML_SPACE.sub(" ", data)
            if data.startswith(" "):
                self.pending_space = not self.at_line_start
                data = data[1:]
            if not data:
                return
            trailing = data.endswith(" ")
            data = data.rstrip(" ")
        else:
            data, trailing = data.replace("\r\n", "\n"), False
        if self.pending_break and self.length:
            self._emit("\n" * self.pending_break)
            self.at_line_start = True
        elif self.pending_space and not self.at_line_start:
            self._emit(" ")
        self.pending_break, self.pending_space = 0, False
        if self.in_heading and self.heading_start < 0:
            self.heading_start, self.heading_part = self.length, len(self.parts)
        self._emit(data)
        self.at_line_start = data.endswith("\n")
        self.pending_space = trailing

    def _emit(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)

    def close(self) -> None:
        super().close()
        self._end_heading()

    @property
    def text(self) -> str:
        return "".join(self.parts)


# How HTMLParser's comments end (_markupbase's pattern).
_COMMENT_CLOSE = re.compile(r"--\s*>")


def _defuse_unclosed(html: str) -> str:
    """`html` with each "<" that opens a construct never closed later escaped as "&lt;".

    At the end of its input, Python's HTMLParser (before 3.12.11 and 3.13.4: CVE-2025-6069)
    rescans to the end for every such "<", so 100 KB of "<a " cost minutes; it then shows
    each as text, which is what the escaped "<" shows too. Every construct ends at a ">"
    and a comment at "--" ">", so the "<" after the last ">" and the "<!--" after the last
    comment end are the ones never closed. A marked section ("<![CDATA[", "<![if ...]>")
    becomes what a browser makes of it in HTML, a bogus comment up to the next ">": the
    parser raises on all but a few keywords, and rescans for an unclosed one."""
    last = html.rfind(">")
    head, tail = html[: last + 1], html[last + 1 :].replace("<", "&lt;")
    closed = max((m.end() for m in _COMMENT_CLOSE.finditer(head)), default=0)
    head = head[:closed] + head[closed:].replace("<!--", "&lt;!--")
    return head.replace("<![", "<! [") + tail


def _parse_html(html: str) -> _VisibleText:
    parser = _VisibleText()
    parser.feed(_defuse_unclosed(html))
    parser.close()
    return parser


def html_to_text(html: str) -> tuple[str, tuple[tuple[int, str], ...]]:
    """Visible text of an HTML page and its h1-h6 headings as (offset, text)."""
    page = _parse_html(html)
    return page.text, tuple(page.headings)


# -------------------------------------------------------------------------------- PDF


def _load_pdf(name: str, source: str, data: bytes) -> Document:
    import logging

    import pypdf

    # pypdf logs every recoverable oddity of a file; our caller reports what matters.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # "" opens owner-only locks
            raise LoaderError(f"{name} is an encrypted (password-protected) PDF; decrypt it first")
        page_texts = [_clean_pdf_text(page.extract_text() or "") for page in reader.pages]
    except LoaderError:
        raise
    # pypdf reports damaged files with many exception types (PdfReadError, ValueError,
    # KeyError, struct errors, RecursionError on cyclic objects, ...).
    except Exception as e:  # noqa: BLE001
        raise LoaderError(
            f"{name} is not a readable PDF ({type(e).__name__}: {e}); is it truncated or damaged?"
        ) from None
    parts, pages, offset = [], [], 0
    for i, page_text in enumerate(page_texts):
        if i:
            parts.append("\n\n")
            offset += 2
        pages.append(offset)
        parts.append(page_text)
        offset += len(page_text)
    text = "".join(parts)
    if not text.strip():
        raise LoaderError(
            f"{name} has no extractable text (a scanned PDF? run OCR on it first)"
            if page_texts
            else f"{name} is empty (a PDF with no pages)"
        )
    return Document(source, text, pages=tuple(pages), headings=())


def _clean_pdf_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # PDFs carry NULs, private-use glyph codes and lone surrogates from broken font maps.
    text = _CONTROL.sub("", text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return unicodedata.normalize("NFC", text).strip("\n")
