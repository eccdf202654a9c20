"""Bounded RAG ingestion (issue 12): what a pathological document costs, and whether
queries and cancellation work while a big one is being ingested.

Parts (all by default; `--parts` picks some):

- density: embedder tokens per UTF-8 byte of real text (the King James chapters of
  tests/data/rag_corpus, falconet's own Python source and Markdown docs, Chinese) and of
  pathological text (dashes, digits, one-letter words): what --max-tokens-per-byte's
  default (0.6) separates.
- chunking: CPU seconds and characters tokenized per character of text, for 1 MiB of
  dashes, 1 MiB of prose and a heading line of 30,000 spaces, by this checkout's chunker
  and by the chunker at `--baseline-rev` (git; default main), side by side.
- html: CPU seconds for the visible text of a page of "<a " never closed, by this
  checkout's reader and `--baseline-rev`'s.
- embed: seconds per embedding call of 8, 16, 32 and 64 chunks of 200 tokens: a query
  waits for one ingestion call at most (`falconet.rag.ingest.EMBED_BATCH`).
- ingest: CPU seconds for `ingest` of 1 MiB of dashes with the default limits (refused).
- server: a real `falconet serve --rag-store --rag-root` process: ingesting a root holding
  a FIFO, a socket, a device node, a 4 GiB sparse file and symlink loops, over HTTP and by
  `falconet rag sync`; a 1 MiB dashes upload (wall time and the server's CPU seconds until
  its 413); hybrid query latency while a ~400-chunk document is being ingested, beside
  the same queries on an idle server; and the server's CPU use before and after a client
  uploading a ~2,000-chunk document hangs up.

    python benchmarks/bench_rag_limits.py
    python benchmarks/bench_rag_limits.py --parts chunking,ingest --baseline-rev HEAD~1
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from falconet.documents import Document  # noqa: E402
from falconet.rag.chunking import chunk_document  # noqa: E402
from falconet.rag.embed import default_embedder  # noqa: E402
from falconet.rag.ingest import ingest  # noqa: E402
from falconet.rag.stores import open_store  # noqa: E402

MIB = 2**20
CORPUS = ROOT / "tests" / "data" / "rag_corpus"
CHINESE = "東京は日本の首都で、人口は約千四百万人です。多くの人が毎日電車で通勤しています。"


def kjv_text(n_bytes: int) -> str:
    parts, size = [], 0
    files = sorted(CORPUS.glob("*.*"))
    while size < n_bytes:
        for f in files:
            t = f.read_text(encoding="utf-8")
            parts.append(t)
            size += len(t.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", "ignore")


def table(rows: list[list], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    print()


# ------------------------------------------------------------------------------ density


def bench_density(embedder) -> None:
    source = "".join(p.read_text() for p in sorted((ROOT / "falconet").rglob("*.py")))
    docs = "".join(
        p.read_text() for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("docs/*.md"))
    )
    rng = random.Random(0)
    samples = {
        "KJV prose (rag_corpus)": kjv_text(MIB),
        "falconet *.py": source[:MIB],
        "README + docs *.md": docs[:MIB],
        "Chinese": CHINESE * 300,
        "dashes": "-" * 200_000,
        "digits '1,2,3,'": ",".join(str(rng.randint(0, 9)) for _ in range(100_000)),
        "one-letter words": " ".join(rng.choice("abcdefgh") for _ in range(100_000)),
        "numbers table": "\n".join(
            "| " + " | ".join(f"{rng.uniform(0, 1000):.2f}" for _ in range(8)) + " |"
            for _ in range(3000)
        ),
    }
    rows = []
    for name, text in samples.items():
        n = len(text.encode())
        rows.append([name, f"{n:,}", f"{embedder.count_tokens(text) / n:.3f}"])
    print("Embedder tokens per UTF-8 byte (the default --max-tokens-per-byte is 0.6)")
    table(rows, ["text", "bytes", "tokens/byte"])


# ----------------------------------------------------------------------------- chunking


def load_baseline(rev: str, rel: str):
    """The module at `rel` (falconet/...) as it was at git revision `rev`."""
    code = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    name = "baseline_" + Path(rel).stem
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_html(rev: str) -> None:
    from falconet.documents import html_to_text

    baseline = load_baseline(rev, "falconet/documents.py").html_to_text
    rows = []
    for n in (10_000, 20_000):
        html = "<p>text</p>" + "<a " * n
        for label, parse in ((rev, baseline), ("this checkout", html_to_text)):
            t0 = time.process_time()
            parse(html)
            rows.append([f"'<a ' x {n:,} ({len(html) // 1024} KB)", label,
                         f"{time.process_time() - t0:.2f}"])  # fmt: skip
    print("HTML visible text of a page of tags never closed")
    table(rows, ["page", "reader", "CPU s"])


def bench_chunking(embedder, rev: str) -> None:
    baseline = load_baseline(rev, "falconet/rag/chunking.py").chunk_document
    texts = {
        "1 MiB dashes": "-" * MIB,
        "1 MiB KJV prose": kjv_text(MIB),
        "'# a' + 30,000 spaces + 'b'": "# a" + " " * 30_000 + "b\n\nbody text\n",
    }
    rows = []
    for name, text in texts.items():
        doc = Document("/bench.md", text)
        for label, chunker in ((rev, baseline), ("this checkout", chunk_document)):
            counted = [0]

            def count(s: str, counted: list[int] = counted) -> int:
                counted[0] += len(s)
                return embedder.count_tokens(s)

            t0 = time.process_time()
            chunks = chunker(doc, count)
            cpu = time.process_time() - t0
            rows.append([name, label, f"{cpu:.2f}", len(chunks), f"{counted[0] / len(text):.1f}"])
    print("Chunking (200-token chunks, 40 overlap; no limits)")
    table(rows, ["text", "chunker", "CPU s", "chunks", "chars counted / char"])


# -------------------------------------------------------------------------------- embed


def bench_embed(embedder) -> None:
    text = " ".join(kjv_text(20_000).split()[:150])  # ~200 tokens
    rows = []
    for batch in (1, 2, 4, 8, 16, 64):
        texts = [text] * batch
        embedder.embed(texts)  # warm
        t0 = time.perf_counter()
        for _ in range(3):
            embedder.embed(texts)
        s = (time.perf_counter() - t0) / 3
        rows.append([batch, f"{s * 1000:.0f}", f"{s * 1000 / batch:.1f}"])
    tokens = embedder.count_tokens(text)
    print(f"Embedding calls of {tokens}-token chunks (torch threads: {torch_threads()})")
    table(rows, ["chunks a call", "ms a call", "ms a chunk"])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------- ingest


def bench_ingest(embedder) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dashes.txt").write_text("-" * MIB)
        with open_store(Path(tmp) / "store") as store:
            t0, c0 = time.perf_counter(), time.process_time()
            report = ingest(store, [Path(tmp) / "dashes.txt"], embedder)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print("ingest() of 1 MiB of dashes, default limits")
    table([[f"{cpu:.2f}", f"{wall:.2f}", report.skipped[0][1][-90:]]],
          ["CPU s", "wall s", "why (end)"])  # fmt: skip


# ------------------------------------------------------------------------------- server


def prose(n_words: int, seed: int) -> str:
    words = kjv_text(200_000).split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(15)) for _ in range(n_words // 15)]
    return "\n\n".join(" ".join(lines[i : i + 5]) for i in range(0, len(lines), 5))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_bad_entries(root: Path) -> None:
    os.mkfifo(root / "fifo.txt")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "socket.txt"))
    try:
        os.mknod(root / "device.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        (root / "device.txt").symlink_to("/dev/null")
    with open(root / "sparse.txt", "wb") as f:
        f.truncate(4 * 2**30)
    (root / "loop.txt").symlink_to(root / "loop.txt")


def upload_on_socket(url: str, name: str, data: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    boundary = "bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"'
            "\r\nContent-Type: text/plain\r\n\r\n").encode() + data  # fmt: skip
    body += f"\r\n--{boundary}--\r\n".encode()
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/rag/documents HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + body)
    return sock


def wait_for(condition, limit_s: float = 300) -> float:
    t0 = time.perf_counter()
    while not condition():
        if time.perf_counter() - t0 > limit_s:
            raise RuntimeError("timed out")
        time.sleep(0.01)
    return time.perf_counter() - t0


def query_latencies(url: str, n: int, stop: threading.Event | None = None) -> list[float]:
    import httpx

    q = {"query": "who slew his brother in the field", "answer": False, "mode": "hybrid"}
    out = []
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/rag/query", json=q, timeout=600)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        time.sleep(0.1)
    return out


def ms(values: list[float]) -> str:
    a = np.array(values) * 1000
    return f"p50 {np.percentile(a, 50):.0f} / max {a.max():.0f} ms (n={len(a)})"


def bench_server() -> None:
    import httpx

    from tests.server_tools import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp).resolve()
        root, store = base / "root", base / "store"
        root.mkdir()
        (root / "cain.txt").write_text(prose(400, seed=1))
        make_bad_entries(root)
        proc = ServerProcess("--rag-store", str(store), "--rag-root", str(root))
        proc.wait_ready()
        url, pid = proc.url, proc.proc.pid
        rows = []
        try:
            query_latencies(url, 1)  # loads the embedder, as any first RAG call does
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/rag/documents", json={"path": str(root)}, timeout=600)
            rows.append(["POST path=root (FIFO, socket, device, 4 GiB sparse, loop)",
                         f"{time.perf_counter() - t0:.2f} s",
                         f"{r.status_code}, {len(r.json()['skipped'])} skipped"])  # fmt: skip
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "falconet", "rag", "sync", str(root),
                                  "--store", str(base / "cli-store")],
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            rows.append(["falconet rag sync root (CLI, incl. start and model load)",
                         f"{time.perf_counter() - t0:.2f} s",
                         f"exit {res.returncode}: {res.stdout.strip().split('; ')[-1]}"])  # fmt: skip

            c0, t0 = cpu_seconds(pid), time.perf_counter()
            r = httpx.post(f"{url}/v1/rag/documents", timeout=600,
                           files={"file": ("dashes.txt", b"-" * MIB)})  # fmt: skip
            rows.append(["upload 1 MiB dashes", f"{time.perf_counter() - t0:.2f} s",
                         f"{r.status_code}; server CPU {cpu_seconds(pid) - c0:.2f} s"])  # fmt: skip

            idle = query_latencies(url, 20)
            rows.append(["hybrid query, idle server", ms(idle), ""])

            data = prose(60_000, seed=2).encode()  # ~400 chunks
            final = store.resolve() / "uploads" / hashlib.sha256(data).hexdigest() / "big.md"
            done = threading.Event()
            result = {}

            def big_upload() -> None:
                t = time.perf_counter()
                resp = httpx.post(f"{url}/v1/rag/documents", timeout=600,
                                  files={"file": ("big.md", data)})  # fmt: skip
                result["s"], result["status"] = time.perf_counter() - t, resp.status_code
                result["chunks"] = resp.json().get("chunks_written")
                done.set()

            threading.Thread(target=big_upload).start()
            wait_for(final.exists)
            busy = query_latencies(url, 1000, stop=done)
            done.wait()
            rows.append(["hybrid query during a big ingest", ms(busy),
                         f"ingest {result['status']}, {result['chunks']} chunks in "
                         f"{result['s']:.1f} s"])  # fmt: skip

            data = prose(300_000, seed=3).encode()  # ~2,000 chunks
            final = store.resolve() / "uploads" / hashlib.sha256(data).hexdigest() / "huge.md"
            sock = upload_on_socket(url, "huge.md", data)
            wait_for(final.exists)
            time.sleep(3)  # chunked by now, embedding
            c0 = cpu_seconds(pid)
            time.sleep(2)
            before = (cpu_seconds(pid) - c0) / 2
            sock.close()
            t0 = time.perf_counter()
            gone_s = wait_for(lambda: not final.exists())
            time.sleep(1)
            c0 = cpu_seconds(pid)
            time.sleep(2)
            after = (cpu_seconds(pid) - c0) / 2
            rows.append(["client hangs up mid-ingest",
                         f"{gone_s:.2f} s to stop",
                         f"server CPU {before * 100:.0f}% before, {after * 100:.0f}% after"])  # fmt: skip
        finally:
            proc.stop()
    print("Server (falconet serve, default model and limits; 2-core machine)")
    table(rows, ["what", "time", "result"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="density,chunking,html,embed,ingest,server")
    p.add_argument("--baseline-rev", default="main", help="git revision of the old chunker")
    args = p.parse_args()
    parts = args.parts.split(",")
    embedder = default_embedder()
    print(f"embedder: {embedder.id}\n")
    if "density" in parts:
        bench_density(embedder)
    if "chunking" in parts:
        bench_chunking(embedder, args.baseline_rev)
    if "html" in parts:
        bench_html(args.baseline_rev)
    if "embed" in parts:
        bench_embed(embedder)
    if "ingest" in parts:
        bench_ingest(embedder)
    if "server" in parts:
        bench_server()


if __name__ == "__main__":
    main()
