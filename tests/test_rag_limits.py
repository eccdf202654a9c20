"""Bounded ingestion: what cannot be read is skipped without being opened, a pathological
document is refused before it is embedded, queries are served while a big document is
being embedded, a client that leaves cancels its ingestion, and uploads that end up in no
stored document are removed. Real files, FIFOs, sockets, device nodes, sparse files and
symlink loops; a real `falconet serve` process for the HTTP cases."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from falconet.errors import IngestCancelled, LimitError, LoaderError, RagError
from falconet.rag.chunking import chunk_document, markdown_headings
from falconet.rag.embed import default_embedder
from falconet.rag.ingest import EMBED_BATCH, IngestLimits, ingest, ingest_file, sync
from falconet.rag.loaders import load_document
from falconet.rag.stores import open_store
from tests.conftest import assert_cli_error
from tests.server_tools import ServerProcess

T = 300  # only there so a broken server cannot hang the suite
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORDS = [
    "falcon",
    "river",
    "harbor",
    "lantern",
    "granite",
    "meadow",
    "orchard",
    "copper",
    "winter",
    "signal",
    "ledger",
]
DASHES = "-" * 2**20  # 1 MiB, one token a byte: 5,000+ chunks of nothing


def prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while n_words > 0:
        k = min(n_words, rng.randint(8, 20))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n\n".join(" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6))


class CountingEmbedder:
    """The real embedder, with its calls counted."""

    def __init__(self, inner):
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.embedded = 0  # texts
        self.counted_chars = 0

    def count_tokens(self, text: str) -> int:
        self.counted_chars += len(text)
        return self.inner.count_tokens(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded += len(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def bytes_read() -> int:
    """Bytes this process has read with read() and friends (Linux /proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def make_bad_entries(root: Path) -> dict[str, str]:
    """A FIFO, a socket, a device node, a 4 GiB sparse file and symlink loops under `root`,
    each named *.txt or *.md so the walk picks it up: the path ingestion reports each by
    -> the reason it is skipped for."""
    os.mkfifo(root / "fifo.txt")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "socket.txt"))
    device = root / "device.txt"
    try:  # a character device like /dev/null (root may create one; others link to it)
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        device.symlink_to("/dev/null")
        device = Path("/dev/null")  # reported as what it resolves to
    with open(root / "sparse.txt", "wb") as f:
        f.truncate(4 * 2**30)
    (root / "loop.txt").symlink_to(root / "loop.txt")
    (root / "ping.md").symlink_to(root / "pong.md")
    (root / "pong.md").symlink_to(root / "ping.md")
    return {
        str(root / "fifo.txt"): "is not a regular file",
        str(root / "socket.txt"): "is not a regular file",
        str(device): "is not a regular file",
        str(root / "sparse.txt"): "is 4096.0 MB, over the 50 MB limit; raise --max-file-mb",
        str(root / "loop.txt"): "cannot be read: a symlink loop",
        str(root / "ping.md"): "cannot be read: a symlink loop",
        str(root / "pong.md"): "cannot be read: a symlink loop",
    }


def rag_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falconet", "rag", *args], capture_output=True,
                          text=True, timeout=T, cwd=cwd, env={**os.environ, **ENV})  # fmt: skip


# ----------------------------------------------------------------- what is never opened


def test_ingest_and_sync_skip_what_is_not_a_regular_file_without_opening_it(tmp_path, embedder):
    root = (tmp_path / "root").resolve()
    root.mkdir()
    (root / "good.txt").write_text(prose(60))
    reasons = make_bad_entries(root)
    with open_store(tmp_path / "store") as store:
        before = bytes_read()
        report = ingest(store, [root], embedder)
        # the 4 GiB file was refused by its size: not a byte of it was hashed
        assert bytes_read() - before < 64 * 2**20
        assert report.added == [str(root / "good.txt")]
        skipped = dict(report.skipped)
        assert skipped.keys() == reasons.keys()
        for path, why in reasons.items():
            assert why in skipped[path], (path, skipped[path])

        again = sync(store, root, embedder)
        assert again.unchanged == report.added and not (again.added or again.removed)
        assert dict(again.skipped) == skipped
        assert [d.source for d in store.documents()] == report.added
        with pytest.raises(RagError, match=r"loop\.txt: a symlink loop"):
            ingest(store, [root / "loop.txt"], embedder)

    # The CLI: one warning per skipped entry, exit 0; a loop named directly is an error.
    res = rag_cli("sync", "root", "--store", "store", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("0 added, 0 updated, 1 unchanged, 0 removed, 7 skipped")
    warnings = [line for line in res.stderr.splitlines() if "warning: skipped" in line]
    assert len(warnings) == 7
    for path, why in reasons.items():
        assert any(path in w and why in w for w in warnings), (path, warnings)
    for args in (
        ["ingest", "root/loop.txt"],
        ["ingest", "root/ping.md"],
        ["sync", "root/loop.txt"],
    ):
        assert_cli_error(rag_cli(*args, cwd=tmp_path), "a symlink loop")


def test_the_reader_opens_regular_files_only(tmp_path):
    os.mkfifo(tmp_path / "fifo.md")
    with pytest.raises(LoaderError, match=r"fifo\.md is not a regular file"):
        load_document(tmp_path / "fifo.md")  # returns: the FIFO has no writer and is not opened
    (tmp_path / "big.txt").write_text("x" * 2048)
    with pytest.raises(LimitError) as e:
        load_document(tmp_path / "big.txt", max_bytes=1024)
    assert e.value.setting == "max_file_mb"
    assert e.value.message("rag-").endswith("over the 1 KB limit; raise --rag-max-file-mb")


# ---------------------------------------------------------------- pathological documents


def test_chunking_counts_each_character_a_few_times_not_thirty(embedder):
    """A wall of dashes (one token a character, no boundary to cut at) is cut by guessing
    each piece's end from the characters per token, not by bisecting down from 3,200
    characters for every 200-character piece."""
    counting = CountingEmbedder(embedder)
    doc = load_document_from_text("-" * 200_000)
    chunks = chunk_document(doc, counting.count_tokens)
    assert "".join(c.text for c in chunks) == doc.text
    assert all(embedder.count_tokens(c.text) <= 200 for c in chunks)
    assert len(chunks) == 1000  # 200 dashes, 200 tokens each; no overlap without words
    assert counting.counted_chars < 5 * len(doc.text)


def load_document_from_text(text: str):
    from falconet.documents import Document

    return Document("/dashes.txt", text, headings=())


def test_heading_patterns_take_linear_time_on_long_runs_of_spaces():
    # The old patterns backtracked over every space of such a line at every position.
    spaces = " " * 50_000
    assert markdown_headings(f"# a{spaces}b\n") == ((0, f"a{spaces}b"),)
    assert markdown_headings(f"#{spaces}\n") == ()
    assert markdown_headings(f"Title{spaces}x{spaces}\n=====\n") == ((0, f"Title{spaces}x"),)
    assert markdown_headings("# Closed ##\n\n# Not#closed#\n") == (
        (0, "Closed"),
        (13, "Not#closed#"),
    )


def test_html_with_constructs_never_closed_reads_in_one_pass(tmp_path):
    # Python 3.11's HTMLParser rescanned to the end for each "<" never closed (20,000 of
    # them: 30 s) and raised AssertionError on an unknown marked section.
    (tmp_path / "tags.html").write_text("<p>kept</p>" + "<a " * 20_000)
    assert load_document(tmp_path / "tags.html").text == "kept\n\n" + ("<a " * 20_000).rstrip()
    (tmp_path / "comments.html").write_text("<!-- a -->shown" + "<!--x>" * 20_000)
    assert load_document(tmp_path / "comments.html").text.startswith("shown<!--x><!--x>")
    # marked sections are bogus comments up to the next ">", as in a browser
    (tmp_path / "marked.html").write_text("<p>a</p><![if x]>b<![CDATA[ c > d ]]><![bogus>e<![")
    assert load_document(tmp_path / "marked.html").text == "a\n\nb d ]]>e<!["


def test_a_pathological_document_is_refused_before_it_is_embedded(tmp_path, embedder):
    docs = (tmp_path / "docs").resolve()
    docs.mkdir()
    (docs / "dashes.txt").write_text(DASHES)
    (docs / "notes.md").write_text(prose(3000))
    counting = CountingEmbedder(embedder)
    with open_store(tmp_path / "store") as store:
        report = ingest(store, [docs], counting)
        [(path, why)] = report.skipped
        assert path == str(docs / "dashes.txt")
        assert "bytes of text, over 0.6 a byte" in why
        assert why.endswith("; raise --max-tokens-per-byte")
        assert report.added == [str(docs / "notes.md")]
        embedded = counting.embedded
        assert embedded == store.document(str(docs / "notes.md")).chunks > 3
        # a tight chunk limit refuses real text too, while chunking: nothing embedded
        (tmp_path / "more.md").write_text(prose(3000, seed=1))
        with pytest.raises(LimitError, match="over 3 chunks.*raise --max-chunks$"):
            ingest_file(store, tmp_path / "more.md", counting, limits=IngestLimits(max_chunks=3))
        assert counting.embedded == embedded and len(store.documents()) == 1
        # a stored document rewritten into noise: its old text stops answering queries
        (docs / "notes.md").write_text(DASHES[:100_000])
        again = sync(store, docs, counting)
        assert again.removed == [str(docs / "notes.md")] and store.documents() == []
        assert counting.embedded == embedded and store.integrity_check() == []


def test_limit_flags_are_checked_before_anything_runs(tmp_path):
    for flag, value, needle in [
        ("--max-file-mb", "0", "--max-file-mb must be at least 1, got 0"),
        ("--max-chunks", "-5", "--max-chunks must be at least 1, got -5"),
        ("--max-tokens-per-byte", "nan", "--max-tokens-per-byte must be more than 0, got nan"),
    ]:
        assert_cli_error(rag_cli("ingest", ".", flag, value, cwd=tmp_path), needle)
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "serve", "--rag-store", "s", "--rag-max-chunks", "0"],
        capture_output=True, text=True, timeout=T, cwd=tmp_path,
    )  # fmt: skip
    assert_cli_error(res, "--rag-max-chunks must be at least 1, got 0")


def test_cancel_stops_at_the_next_batch_and_stores_nothing(tmp_path, embedder):
    (tmp_path / "long.md").write_text(prose(6000))
    cancel = threading.Event()

    class CancelAfterTwoBatches(CountingEmbedder):
        def embed(self, texts):
            if self.embedded >= 2 * EMBED_BATCH:
                cancel.set()
            return super().embed(texts)

    counting = CancelAfterTwoBatches(embedder)
    with open_store(tmp_path / "store") as store:
        with pytest.raises(IngestCancelled):
            ingest(store, [tmp_path / "long.md"], counting, cancel=cancel)
        assert counting.embedded == 3 * EMBED_BATCH and store.documents() == []
        assert store.integrity_check() == []


# -------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedder):
    base = tmp_path_factory.mktemp("rag-limits")
    root, store = (base / "root").resolve(), base / "store"
    root.mkdir()
    (root / "good.txt").write_text(prose(60))
    make_bad_entries(root)
    # Left by a killed server: a temp file and an ingested-but-not-committed upload, beside
    # an upload a document references.
    uploads = store / "uploads"
    for rel in (".upload-abc.txt", "0" * 64 + "/orphan.txt", "1" * 64 + "/kept.txt"):
        (uploads / rel).parent.mkdir(parents=True, exist_ok=True)
        (uploads / rel).write_text(prose(30, seed=len(rel)))
    with open_store(store) as s:
        ingest(s, [uploads / ("1" * 64) / "kept.txt"], embedder)
    proc = ServerProcess("--rag-store", str(store), "--rag-root", str(root), env=ENV)
    try:
        proc.wait_ready()
        yield {"url": proc.url, "root": root, "store": store, "uploads": uploads.resolve()}
    finally:
        proc.stop()


def test_orphaned_uploads_are_removed_when_the_server_starts(server):
    left = sorted(p.relative_to(server["uploads"]).as_posix() for p in server["uploads"].rglob("*"))
    assert left == ["1" * 64, "1" * 64 + "/kept.txt"]


def test_bad_entries_under_a_root_are_reported_and_the_routes_stay_responsive(server):
    url, root = server["url"], server["root"]
    r = httpx.post(f"{url}/v1/rag/documents", json={"path": str(root)}, timeout=T)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["added"] == [str(root / "good.txt")]
    reasons = {s["source"]: s["reason"] for s in out["skipped"]}
    assert len(reasons) == 7
    assert "over the 50 MB limit; raise --rag-max-file-mb" in reasons[str(root / "sparse.txt")]
    assert "is not a regular file" in reasons[str(root / "fifo.txt")]
    for name in ("fifo.txt", "socket.txt", "loop.txt"):  # named one by one: no hang either
        r = httpx.post(f"{url}/v1/rag/documents", json={"path": name}, timeout=T)
        assert r.status_code in (200, 400), r.text
    q = {"query": "falcon river", "answer": False}
    assert httpx.post(f"{url}/v1/rag/query", json=q, timeout=T).status_code == 200
    assert httpx.get(f"{url}/v1/rag/documents", timeout=T).status_code == 200


def test_a_pathological_upload_is_refused_with_413_and_leaves_nothing(server):
    url, uploads = server["url"], server["uploads"]
    before = set(uploads.rglob("*"))
    docs = httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"]
    r = httpx.post(f"{url}/v1/rag/documents", files={"file": ("dashes.txt", DASHES.encode())},
                   timeout=T)  # fmt: skip
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and err["code"] == "document_too_large"
    assert "dashes.txt has over" in err["message"] and "over 0.6 a byte" in err["message"]
    assert err["message"].endswith("raise --rag-max-tokens-per-byte")
    assert set(uploads.rglob("*")) == before
    assert httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"] == docs


def multipart(name: str, data: bytes, boundary: str = "falconet-test-boundary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: text/plain\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def send_upload(url: str, name: str, data: bytes) -> socket.socket:
    """POST an upload on a raw socket (so the test can hang up mid-ingestion)."""
    host, port = url.removeprefix("http://").split(":")
    body = multipart(name, data)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/rag/documents HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
        b"boundary=falconet-test-boundary\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    return sock


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + T  # a hang guard, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def test_a_query_is_answered_while_a_big_document_is_being_embedded(server):
    url, uploads = server["url"], server["uploads"]
    data = prose(25_000, seed=7).encode()  # ~150 chunks: many embedding batches
    final = uploads / hashlib.sha256(data).hexdigest() / "big.md"
    done: list[str] = []

    def upload() -> None:
        r = httpx.post(f"{url}/v1/rag/documents", files={"file": ("big.md", data)}, timeout=T)
        assert r.status_code == 200, r.text
        done.append("ingest")

    ingesting = threading.Thread(target=upload)
    ingesting.start()
    wait_for(final.exists, "the upload moved into place, its ingestion begun")
    q = {"query": "falcon river meadow", "answer": False, "mode": "hybrid"}
    r = httpx.post(f"{url}/v1/rag/query", json=q, timeout=T)
    done.append("query")
    assert r.status_code == 200 and r.json()["sources"]
    ingesting.join(T)
    assert done == ["query", "ingest"]  # the query did not wait for the whole document
    docs = httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"]
    assert str(final) in {d["source"] for d in docs}


def test_a_client_that_hangs_up_cancels_its_ingestion(server):
    url, uploads = server["url"], server["uploads"]
    data = prose(300_000, seed=11).encode()  # ~2,000 chunks: minutes to embed
    final = uploads / hashlib.sha256(data).hexdigest() / "huge.md"
    sock = send_upload(url, "huge.md", data)
    try:
        wait_for(final.exists, "the upload moved into place, its ingestion begun")
    finally:
        sock.close()
    # The ingestion stops at its next batch: nothing stored, and its file removed (the
    # server unlinks the file, then its folder: wait for the second, which implies both).
    wait_for(lambda: not final.parent.exists(), "the cancelled upload's file and folder removed")
    assert not final.exists()
    docs = httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"]
    assert str(final) not in {d["source"] for d in docs}
    q = {"query": "falcon river", "answer": False}
    assert httpx.post(f"{url}/v1/rag/query", json=q, timeout=T).status_code == 200
