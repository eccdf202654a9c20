"""The RAG endpoints through a real `falconet serve --rag-store --rag-root` process on the
default model: uploads, ingestion by path, queries (plain and streamed), deletion; hostile
paths and malformed uploads get 400/413 and leave the store unchanged."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import httpx
import pytest

from falconet.rag.store_sqlite import STORE_FILE, SQLiteStore
from tests.server_tools import ServerProcess, sse_events

T = 120
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CAIN = ("And Cain talked with Abel his brother: and it came to pass, when they were in the "
        "field, that Cain rose up against Abel his brother, and slew him.\n")  # fmt: skip
FLOOD = ("# The flood\n\nAnd the waters prevailed exceedingly upon the earth; and all the high "
         "hills, that were under the whole heaven, were covered.\n")  # fmt: skip
BABEL = ("Therefore is the name of it called Babel; because the LORD did there confound the "
         "language of all the earth.\n")  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("rag-http")
    root, store, outside = base / "root", base / "store", base / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "babel.txt").write_text(BABEL)
    (outside / "secret.txt").write_text("the secret password is swordfish\n")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside)
    procs = {
        "rag": ServerProcess(
            "--rag-store", str(store), "--rag-root", str(root), "--rag-max-upload-mb", "1", env=ENV
        ),  # fmt: skip
        "plain": ServerProcess(env=ENV),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield {"root": root, "store": store, "outside": outside, **procs}
    finally:
        for p in procs.values():
            p.stop()


def checksum(store: Path) -> str:
    uri = f"file:{store / STORE_FILE}?mode=ro"
    s = SQLiteStore.__new__(SQLiteStore)
    s._db = sqlite3.connect(uri, uri=True)
    try:
        return s.checksum()
    finally:
        s._db.close()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def upload(url: str, files, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/rag/documents", files=files, timeout=T, **kw)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_rag_endpoints_end_to_end(env):
    url, store = env["rag"].url, env["store"]
    r = upload(url, [("file", ("cain.txt", CAIN.encode(), "text/plain")),
                     ("file", ("flood.md", FLOOD.encode(), "text/markdown"))])  # fmt: skip
    assert r.status_code == 200, r.text
    reports = r.json()["reports"]
    assert [len(x["added"]) for x in reports] == [1, 1]
    uploaded = [x["added"][0] for x in reports]
    for s in uploaded:
        assert Path(s).is_relative_to((store / "uploads").resolve())
    r = httpx.post(f"{url}/v1/rag/documents", json={"path": "babel.txt"}, timeout=T)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == [str((env["root"] / "babel.txt").resolve())]
    # a folder under the root: its symlink pointing out is skipped, not ingested
    r = httpx.post(f"{url}/v1/rag/documents", json={"path": str(env["root"])}, timeout=T)
    assert r.status_code == 200, r.text
    assert not any("secret" in s for s in r.json()["added"] + r.json()["updated"])

    docs = httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"]
    assert len(docs) == 3
    for d in docs:
        assert {"id", "source", "sha256", "version", "chunks", "ingested_at"} <= set(d)
    assert not any("secret" in d["source"] for d in docs)

    q = {"query": "Who slew Abel his brother?", "k": 3, "max_tokens": 8}
    r = httpx.post(f"{url}/v1/rag/query", json=q, timeout=T)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["answer"], str) and out["usage"]["completion_tokens"] >= 1
    assert [s["number"] for s in out["sources"]] == list(range(1, len(out["sources"]) + 1))
    assert "Cain" in out["sources"][0]["text"]
    assert out["sources"][0]["source"].endswith("cain.txt")

    r = httpx.post(
        f"{url}/v1/rag/query",
        json={**q, "query": "Cain Abel", "answer": False, "mode": "bm25"},
        timeout=T,
    )
    assert r.status_code == 200 and "answer" not in r.json()
    assert "Cain" in r.json()["sources"][0]["text"]

    with httpx.stream("POST", f"{url}/v1/rag/query", json={**q, "stream": True},
                      timeout=T) as resp:  # fmt: skip
        assert resp.status_code == 200
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    assert "Cain" in events[0]["sources"][0]["text"]
    deltas = [e["delta"] for e in events[1:-1] if "delta" in e]
    assert all(isinstance(d, str) for d in deltas) and deltas

    for body, param in [({"query": ""}, "query"), ({"query": "x", "k": 0}, "k"),
                        ({"query": "x", "mode": "fuzzy"}, "mode"),
                        ({"query": "x", "stream": "yes"}, "stream")]:  # fmt: skip
        assert assert_error(httpx.post(f"{url}/v1/rag/query", json=body, timeout=T),
                            400)["param"] == param  # fmt: skip

    cain = next(d for d in docs if d["source"].endswith("cain.txt"))
    r = httpx.delete(f"{url}/v1/rag/documents/{cain['id']}", timeout=T)
    assert r.status_code == 200 and r.json()["id"] == cain["id"]
    assert_error(httpx.delete(f"{url}/v1/rag/documents/{cain['id']}", timeout=T), 404)
    assert len(httpx.get(f"{url}/v1/rag/documents", timeout=T).json()["data"]) == 2
    assert httpx.get(f"{url}/health", timeout=T).status_code == 200


def hostile_paths(env) -> list:
    return [
        "../outside/secret.txt",
        str(env["outside"] / "secret.txt"),
        str(env["outside"]),
        str(env["root"] / ".." / "outside" / "secret.txt"),
        "link.txt",  # a symlink inside the root pointing out
        "linkdir/secret.txt",
        "babel.txt\x00.txt",
        "/etc/passwd",
        "no-such-file.txt",
        "",
        42,
        None,
        ["babel.txt"],
        {"path": "babel.txt"},
    ]


def test_hostile_paths_are_refused_and_leave_the_store_unchanged(env):
    url, store = env["rag"].url, env["store"]
    httpx.post(f"{url}/v1/rag/documents", json={"path": "babel.txt"}, timeout=T)
    before = checksum(store)
    for path in hostile_paths(env):
        r = httpx.post(f"{url}/v1/rag/documents", json={"path": path}, timeout=T)
        assert assert_error(r, 400)["param"] == "path", path
    for raw in [b'{"path": "babel.txt", "x": 1}', b"[1]", b"{not json"]:
        r = httpx.post(f"{url}/v1/rag/documents", content=raw, timeout=T,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert_error(r, 400)
    # a lone surrogate (here the one os.fsdecode makes of the byte 0xff): no file name
    r = httpx.post(f"{url}/v1/rag/documents", content=b'{"path": "babel\\udcff.txt"}',
                   timeout=T, headers={"content-type": "application/json"})  # fmt: skip
    assert assert_error(r, 400)["param"] == "path"
    assert checksum(store) == before
    assert httpx.get(f"{url}/health", timeout=T).status_code == 200


def test_malformed_uploads_are_refused_and_leave_the_store_unchanged(env):
    url, store = env["rag"].url, env["store"]
    base = store.parent
    before, files_before = checksum(store), files_under(base)
    binary = bytes(range(256)) * 64
    cases = [
        ({"content": b"just text", "headers": {"content-type": "text/plain"}}, 400),
        (
            {
                "content": b"--x\r\nnonsense",
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
            400,
        ),  # fmt: skip
        ({"files": {"other": ("a.txt", b"hello there", "text/plain")}}, 400),
        ({"data": {"file": "not a file"}, "files": {"x": ("a.txt", b"hi", "text/plain")}}, 400),
        ({"files": {"file": ("empty.txt", b"", "text/plain")}}, 400),
        ({"files": {"file": ("blank.txt", b"   \n\n ", "text/plain")}}, 400),
        ({"files": {"file": ("binary.txt", binary, "text/plain")}}, 400),
        ({"files": {"file": ("program.exe", b"MZ hello", "application/octet-stream")}}, 415),
        ({"files": {"file": ("noext", b"hello", "text/plain")}}, 415),
        ({"files": {"file": ("..", b"hello", "text/plain")}}, 400),
        ({"files": {"file": ("big.txt", b"word " * (300 * 1024), "text/plain")}}, 413),
    ]
    for kw, status in cases:
        r = httpx.post(f"{url}/v1/rag/documents", timeout=T, **kw)
        assert_error(r, status)
    assert checksum(store) == before
    assert files_under(base) == files_before  # no temp file left behind

    # A name with path traversal is reduced to its base name, inside the uploads folder.
    r = upload(url, {"file": ("../../evil.txt", b"an evil but valid text\n", "text/plain")})
    assert r.status_code == 200, r.text
    [source] = r.json()["added"]
    uploads = (store / "uploads").resolve()
    assert Path(source).parent.parent == uploads and Path(source).name == "evil.txt"
    assert not any(p.name == "evil.txt" for p in base.iterdir())
    assert not (store / "evil.txt").exists()
    assert httpx.get(f"{url}/health", timeout=T).status_code == 200


def test_without_rag_store_the_routes_answer_404(env):
    url = env["plain"].url
    for method, path, kw in [("GET", "/v1/rag/documents", {}),
                             ("POST", "/v1/rag/documents", {"json": {"path": "x"}}),
                             ("DELETE", "/v1/rag/documents/abc", {}),
                             ("POST", "/v1/rag/query", {"json": {"query": "x"}})]:  # fmt: skip
        r = httpx.request(method, f"{url}{path}", timeout=T, **kw)
        err = assert_error(r, 404)
        assert "--rag-store" in err["message"]
    assert httpx.get(f"{url}/health", timeout=T).status_code == 200


def test_ingesting_a_root_with_odd_entries_never_fails_the_server(env):
    """{"path": "."} and a path equal to the --rag-root walk every file under it: a name
    that is not UTF-8 (the store keys documents by their path as text), a symlink loop, a
    FIFO and a folder that links to itself are reported as skipped, never a 500."""
    url, root = env["rag"].url, env["root"]
    odd = root / "odd"
    odd.mkdir()
    (odd / "fine.txt").write_text(CAIN)
    with open(os.fsencode(odd) + b"/caf\xe9.txt", "wb") as f:  # Latin-1, not UTF-8
        f.write(b"a file whose name is not UTF-8\n")
    (odd / "loop.txt").symlink_to(odd / "loop.txt")
    os.mkfifo(odd / "fifo.txt")
    (odd / "self").symlink_to(odd)
    for path in [".", str(root), "odd", str(odd)]:
        r = httpx.post(f"{url}/v1/rag/documents", json={"path": path}, timeout=T)
        assert r.status_code == 200, (path, r.text)
        report = r.json()
        skipped = {Path(x["source"]).name: x["reason"] for x in report["skipped"]}
        assert "not valid UTF-8" in skipped["caf\\xe9.txt"], skipped
        assert {"loop.txt", "fifo.txt"} <= set(skipped)
        sources = report["added"] + report["updated"] + report["unchanged"]
        assert str((odd / "fine.txt").resolve()) in sources
    assert httpx.get(f"{url}/health", timeout=T).json() == {"status": "ok"}
