"""`falconet rag ...` run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from falconet.rag.stores import open_store
from tests.conftest import assert_cli_error

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def rag(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "falconet", "rag", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=cwd,
    )


def write_docs(folder: Path) -> None:
    folder.mkdir()
    (folder / "birds.md").write_text(
        "# Falcons\n\nThe peregrine falcon is the fastest animal, diving at over 300 km/h.\n\n"
        "# Owls\n\nOwls hunt at night and fly almost silently.\n"
    )
    (folder / "boats.txt").write_text("A schooner is a sailing ship with two or more masts.\n")
    (folder / "page.html").write_text(
        "<html><head><title>x</title><script>var hidden = 1;</script></head>"
        "<body><h1>Bread</h1><p>Sourdough rises with wild yeast.</p></body></html>"
    )
    (folder / "blob.txt").write_bytes(bytes(range(256)) * 4)


def test_ingest_list_search_remove_in_the_default_store(tmp_path):
    write_docs(tmp_path / "docs")
    res = rag("ingest", "docs", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("3 added, 0 updated, 0 unchanged, 0 removed, 1 skipped")
    assert "falconet: warning: skipped " + str(tmp_path / "docs" / "blob.txt") in res.stderr
    assert "ingest: 100%" in res.stderr  # the progress bar, on stderr
    assert (tmp_path / ".falconet-rag" / "store.sqlite3").is_file()

    listed = rag("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "version", "chunks", "source"]
    assert [line.split()[-1] for line in lines[1:]] == sorted(
        str(tmp_path / "docs" / n) for n in ("birds.md", "boats.txt", "page.html")
    )

    bm25 = rag("search", "schooner masts", "--mode", "bm25", "-k", "1", cwd=tmp_path)
    assert bm25.returncode == 0, bm25.stderr
    assert bm25.stdout.startswith(f"[1] {tmp_path / 'docs' / 'boats.txt'} (chars 0-")
    assert "schooner is a sailing ship" in bm25.stdout and "[2]" not in bm25.stdout
    hybrid = rag("search", "which bird is the fastest?", cwd=tmp_path)
    assert hybrid.returncode == 0, hybrid.stderr
    first = hybrid.stdout.splitlines()[0]
    assert first.startswith(f"[1] {tmp_path / 'docs' / 'birds.md'}, Falcons"), hybrid.stdout
    assert "script" not in hybrid.stdout and "hidden" not in hybrid.stdout

    doc_id = lines[1].split()[0]  # a 12-character id prefix names a document
    removed = rag("remove", doc_id, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith(f"removed {tmp_path / 'docs' / 'birds.md'}")
    with open_store(tmp_path / ".falconet-rag") as store:
        assert len(store.documents()) == 2 and store.integrity_check() == []
        assert store.search_bm25("peregrine", 5) == []

    again = rag("sync", "docs", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("1 added, 0 updated, 2 unchanged, 0 removed, 1 skipped")


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    assert_cli_error(rag("list", "--store", "nowhere", cwd=tmp_path), "no RAG store")
    assert_cli_error(rag("search", "x", "--store", "nowhere", cwd=tmp_path), "no RAG store")
    assert_cli_error(rag("ingest", "missing.txt", cwd=tmp_path), "missing.txt: no such file")
    assert_cli_error(rag("sync", "a.txt", cwd=tmp_path), "not a folder")
    assert_cli_error(rag("list", "--store", "a.txt", cwd=tmp_path), "is a file")
    assert_cli_error(rag("search", "x", "--mode", "magic", cwd=tmp_path), "invalid choice")
    assert_cli_error(rag(cwd=tmp_path), "required: {ingest,sync,list,remove,search}")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "store.sqlite3").write_bytes(b"\x00garbage" * 512)
    for args in (["list"], ["ingest", "a.txt"], ["remove", "x"], ["search", "x"]):
        assert_cli_error(rag(*args, "--store", "broken", cwd=tmp_path), "not a readable RAG store")

    open_store(tmp_path / "empty").close()
    assert_cli_error(rag("remove", "abc", "--store", "empty", cwd=tmp_path), "no document 'abc'")
    assert_cli_error(rag("search", "x", "-k", "0", "--store", "empty", cwd=tmp_path), "-k must")
    res = rag("search", "anything", "--store", "empty", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == "no matching passages\n"
    res = rag("list", "--store", "empty", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("no documents")


def test_ask_streams_an_answer_and_prints_the_numbered_sources(tmp_path):
    """`rag ask` on the embedded default model: an answer, then the sources it was given."""
    corpus = Path(__file__).parent / "data" / "rag_corpus"
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("jonah-01.txt", "jonah-03.txt", "ruth-01.md"):
        (docs / name).write_bytes((corpus / name).read_bytes())
    assert rag("ingest", "docs", cwd=tmp_path).returncode == 0
    res = rag("ask", "Where did Jonah flee from the LORD?", "-k", "3", "--max-tokens", "24",
              cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    answer, _, sources = res.stdout.partition("\n\nSources:\n")
    assert answer.strip() and sources
    lines = sources.strip().splitlines()
    assert 1 <= len(lines) <= 3
    assert [line.split()[0] for line in lines] == [f"[{n}]" for n in range(1, len(lines) + 1)]
    assert lines[0].split()[1].startswith(str(docs / "jonah-01.txt"))  # the best match first

    empty = rag("ask", "anything", "--store", str(tmp_path / "new"), cwd=tmp_path)
    assert_cli_error(empty, "no RAG store at")


def test_ask_bad_flags_are_one_line_errors(tmp_path):
    write_docs(tmp_path / "docs")
    assert rag("ingest", "docs", cwd=tmp_path).returncode == 0
    assert_cli_error(rag("ask", "q", "-k", "0", cwd=tmp_path), "-k must be at least 1")
    assert_cli_error(rag("ask", "q", "--max-tokens", "0", cwd=tmp_path), "max_tokens")
