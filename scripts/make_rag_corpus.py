"""Write tests/data/rag_corpus/: the public-domain corpus of the RAG retrieval test.

The source is the King James Bible as scripts/fetch_kjv.sh writes it into data/kjv (one
file per book, one verse a line, a blank line between chapters, verse numbers removed).
This script copies the chapters listed in CHAPTERS, one file per chapter, byte for byte
the same every run: Markdown files open with a '# Book N' heading and a blank line, text
files are the verses alone. Which chapter gets which extension is part of the table, so
both loaders are exercised. tests/data/rag_questions.json quotes these files verbatim.

Usage: .venv/bin/python scripts/make_rag_corpus.py [--kjv data/kjv] [--out tests/data/rag_corpus]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (file in data/kjv, book title, chapter, extension of the written file)
CHAPTERS = [
    ("01-Ge.txt", "Genesis", 1, "md"),
    ("01-Ge.txt", "Genesis", 3, "txt"),
    ("01-Ge.txt", "Genesis", 7, "md"),
    ("01-Ge.txt", "Genesis", 11, "txt"),
    ("01-Ge.txt", "Genesis", 22, "md"),
    ("01-Ge.txt", "Genesis", 37, "txt"),
    ("01-Ge.txt", "Genesis", 41, "md"),
    ("02-Exo.txt", "Exodus", 3, "txt"),
    ("02-Exo.txt", "Exodus", 14, "md"),
    ("02-Exo.txt", "Exodus", 16, "txt"),
    ("02-Exo.txt", "Exodus", 20, "md"),
    ("02-Exo.txt", "Exodus", 32, "txt"),
    ("04-Num.txt", "Numbers", 22, "md"),
    ("07-Jdgs.txt", "Judges", 16, "txt"),
    ("08-Ruth.txt", "Ruth", 1, "md"),
    ("08-Ruth.txt", "Ruth", 2, "txt"),
    ("08-Ruth.txt", "Ruth", 3, "md"),
    ("08-Ruth.txt", "Ruth", 4, "txt"),
    ("09-1Sm.txt", "1 Samuel", 3, "md"),
    ("09-1Sm.txt", "1 Samuel", 16, "txt"),
    ("09-1Sm.txt", "1 Samuel", 17, "md"),
    ("11-1Ki.txt", "1 Kings", 3, "txt"),
    ("11-1Ki.txt", "1 Kings", 18, "md"),
    ("17-Est.txt", "Esther", 4, "txt"),
    ("17-Est.txt", "Esther", 5, "md"),
    ("17-Est.txt", "Esther", 7, "txt"),
    ("27-Dan.txt", "Daniel", 3, "md"),
    ("27-Dan.txt", "Daniel", 5, "txt"),
    ("27-Dan.txt", "Daniel", 6, "md"),
    ("32-Jonah.txt", "Jonah", 1, "txt"),
    ("32-Jonah.txt", "Jonah", 2, "md"),
    ("32-Jonah.txt", "Jonah", 3, "txt"),
    ("32-Jonah.txt", "Jonah", 4, "md"),
]

README = """\
# RAG retrieval test corpus

{n} chapters of the King James Bible (1611, the text of Debian's `bible-kjv-text`), one
file per chapter, one verse a line, verse numbers removed. The `.md` files open with a
`# Book N` heading; the `.txt` files hold the verses alone.

Licence: the King James Version is in the public domain (outside the United Kingdom,
where the Crown's perpetual rights are administered by the King's Printer).

Written by `scripts/make_rag_corpus.py` from `data/kjv` (`scripts/fetch_kjv.sh`); do not
edit the chapter files by hand: `tests/data/rag_questions.json` quotes them verbatim and
`tests/test_rag_retrieval.py` measures recall@5 over them.
"""


def file_name(book: str, chapter: int, ext: str) -> str:
    return f"{book.lower().replace(' ', '')}-{chapter:02d}.{ext}"


def read_chapters(path: Path) -> list[str]:
    """A book's chapters, each its verses joined by newlines."""
    text = path.read_text(encoding="utf-8")
    return [c.strip("\n") for c in text.split("\n\n")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kjv", type=Path, default=ROOT / "data" / "kjv")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "rag_corpus")
    args = ap.parse_args()
    if not args.kjv.is_dir():
        print(f"{args.kjv} is missing: run scripts/fetch_kjv.sh first", file=sys.stderr)
        return 1
    books: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    for source, book, chapter, ext in CHAPTERS:
        if source not in books:
            books[source] = read_chapters(args.kjv / source)
        verses = books[source][chapter - 1]
        body = verses + "\n"
        if ext == "md":
            body = f"# {book} {chapter}\n\n" + body
        files[file_name(book, chapter, ext)] = body
    files["README.md"] = README.format(n=len(CHAPTERS))
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for name, body in files.items():
        (args.out / name).write_text(body, encoding="utf-8")
    total = sum(len(b.encode()) for b in files.values())
    print(f"{len(CHAPTERS)} chapters, {total / 1024:.0f} KB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
