"""`falconet serve` under clients that misbehave or leave: a real server process on the
embedded falconet-tiny model (and, for the 500 path, the real app under a real uvicorn).

- the disconnect metric counts clients that left before the end, and nothing else;
- large prompts are tokenized off the event loop: /health answers while they are in
  flight (shown by the order of answers, never by timing them);
- a request head or body that stalls, or a keep-alive connection left idle, gets the
  connection closed (--timeout-header, --timeout-body, --timeout-keep-alive);
- an unexpected error's 500 says `Connection: close` before the server closes it;
- the new flags refuse bad values with one line and exit 2.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import assert_cli_error
from tests.server_tools import ServerProcess, metric, sse_events

MODEL = "falconet-tiny"
T = 120  # client timeout: only there so a broken server cannot hang the suite
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DISCONNECTS = "falconet_client_disconnects_total"
MAX_BODY = 4 * 2**20  # the server's default body limit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("rag-store")
    with ServerProcess("--max-batch", "16", "--rag-store", str(store),
                       "--timeout-header", "1", "--timeout-body", "1", env=ENV) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.openai_client(T)


def scrape(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=T).text


# --- the disconnect metric ---------------------------------------------------------

LONG = {"max_tokens": 180, "temperature": 0, "ignore_eos": True}  # far from done at event 2
SHORT = {"max_tokens": 6, "temperature": 0}
CHAT = [{"role": "user", "content": "And God said"}]


def rag_stream(server: ServerProcess, body: dict, keep: int | None) -> list:
    """A streamed RAG answer (bm25 on the empty store: the question alone); with `keep`,
    the connection is dropped after that many events."""
    body = {"query": "Let there be light", "mode": "bm25", "stream": True, **body}
    with httpx.Client(timeout=T) as c, c.stream("POST", f"{server.url}/v1/rag/query",
                                                 json=body) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        events = []
        for line in r.iter_lines():
            events += sse_events([line])
            if keep is not None and len(events) == keep:
                break  # leaving both blocks closes the connection mid-stream
    return events


def completion_stream(client: openai.OpenAI, body: dict, keep: int | None) -> int:
    stream = client.completions.create(model=MODEL, prompt="In the beginning", stream=True,
                                       **_openai(body))  # fmt: skip
    return _read(stream, keep)


def chat_stream(client: openai.OpenAI, body: dict, keep: int | None) -> int:
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                            **_openai(body))  # fmt: skip
    return _read(stream, keep)


def _openai(body: dict) -> dict:
    """The vLLM extra `ignore_eos` goes in `extra_body` with the openai client."""
    extra = {k: v for k, v in body.items() if k == "ignore_eos"}
    return {**{k: v for k, v in body.items() if k not in extra}, "extra_body": extra}


def _read(stream, keep: int | None) -> int:
    seen = 0
    with stream:  # closing an unfinished stream closes its connection
        for _ in stream:
            seen += 1
            if keep is not None and seen == keep:
                break
    return seen


def test_disconnect_metric_counts_only_clients_that_left(server, client):
    kinds = [completion_stream] * 7 + [chat_stream] * 7
    before = metric(scrape(server), DISCONNECTS)

    # 20 streams read to their end: no disconnects.
    with ThreadPoolExecutor(4) as pool:
        ends = list(pool.map(lambda f: f(client, SHORT, None), kinds))
        rag_ends = list(pool.map(lambda _: rag_stream(server, SHORT, None), range(6)))
    assert all(n >= 1 for n in ends)
    assert all(e[0].keys() == {"sources"} and e[-1] == "[DONE]" for e in rag_ends)
    assert metric(scrape(server), DISCONNECTS) == before

    # 20 streams dropped after two events each, while the server still generates.
    for f in kinds:
        assert f(client, LONG, 2) == 2
    for _ in range(6):
        events = rag_stream(server, LONG, 2)
        assert events[0].keys() == {"sources"} and events[1].keys() == {"delta"}
    deadline = time.monotonic() + 60
    while True:  # the server notices each one, cancels it and counts it
        text = scrape(server)
        settled = metric(text, "falconet_sequences_running") == 0
        if settled and metric(text, DISCONNECTS) >= before + 20:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert metric(scrape(server), DISCONNECTS) == before + 20


# --- large prompts stay off the event loop -----------------------------------------


def test_health_answers_while_large_prompts_are_tokenized(server):
    """Three ~4 MiB prompts are sent; once all three bodies are uploaded, /health is
    asked five times in a row. Every answer must come back before any of the three
    large requests is answered: the event loop is free while they are tokenized (were
    they tokenized on it, each answer would wait for the tokenizing to end)."""
    words = " ".join(f"w{i % 9973}x" for i in range(MAX_BODY // 7))
    prompt = words[: MAX_BODY - 200]
    body = ('{"prompt": "' + prompt + '", "max_tokens": 1}').encode()
    assert len(body) <= MAX_BODY
    uploaded = [threading.Event() for _ in range(3)]
    order: list[str] = []  # "big" and "health" answers, as they arrive
    results: list[httpx.Response] = []

    def chunks(done: threading.Event):
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]
        done.set()

    def big(done: threading.Event) -> None:
        r = httpx.post(f"{server.url}/v1/completions", content=chunks(done), timeout=T,
                       headers={"Content-Type": "application/json",
                                "Content-Length": str(len(body))})  # fmt: skip
        order.append("big")
        results.append(r)

    threads = [threading.Thread(target=big, args=(e,)) for e in uploaded]
    for t in threads:
        t.start()
    try:
        for e in uploaded:
            assert e.wait(T)
        with httpx.Client(timeout=T) as c:
            for _ in range(5):
                assert c.get(f"{server.url}/health").status_code == 200
                order.append("health")
    finally:
        for t in threads:
            t.join(T)
    assert order[:5] == ["health"] * 5, order
    for r in results:  # they really were tokenized: far beyond the 256-token context
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text


def test_request_workers_answer_429_beyond_their_queue():
    """The worker threads' bound: with one thread busy and one job waiting, a third job
    is refused at once (429 + Retry-After); the two it holds still finish, and so does
    a job that may not be refused."""
    import asyncio

    from falconet.server.fields import APIError
    from falconet.server.workers import RequestWorkers

    workers = RequestWorkers(threads=1, max_waiting=1)
    release = threading.Event()

    async def main() -> None:
        busy = asyncio.ensure_future(workers.run(release.wait, T))
        waiting = asyncio.ensure_future(workers.run(lambda: "waited"))
        await asyncio.sleep(0)  # both tasks take their places before the third comes
        with pytest.raises(APIError) as refused:
            await workers.run(lambda: "refused")
        assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
        assert not waiting.done()  # it waits for the one thread
        # A finished generation's answer is never refused: it waits its turn.
        answer = asyncio.ensure_future(workers.run(lambda: "answer", may_refuse=False))
        release.set()
        assert await busy is True and await waiting == "waited" and await answer == "answer"
        assert await workers.run(lambda: "free again") == "free again"

    asyncio.run(main())


# --- slow clients ------------------------------------------------------------------


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(30)  # generous: the server is told to give up after 1 s
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_a_request_head_gets_the_connection_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: falconet\r\n")  # no blank line: stalls
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert read_until_closed(sock) == b""  # connected, sent nothing: closed silently
    assert httpx.get(f"{server.url}/health", timeout=T).status_code == 200


def test_a_stalled_body_gets_408_and_the_connection_closed(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: falconet\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"prompt": "In the')
        answer = read_until_closed(sock)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408 "), answer
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    err = httpx.Response(408, content=payload).json()["error"]
    assert err["code"] == "request_timeout" and "did not arrive in time" in err["message"]


def test_an_unread_body_closes_the_connection(server):
    """A 404 answered before its body is read: the connection is closed rather than kept
    for a client that could then trickle the body forever."""
    head = (b"POST /v1/nothing-here HTTP/1.1\r\nHost: falconet\r\n"
            b"Content-Length: 1000000\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"x" * 100)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 404 "), answer
    assert b"connection: close" in answer.lower()


# --- a 500 closes with Connection: close -------------------------------------------


@contextlib.contextmanager
def uvicorn_thread(app, keep_alive: float):
    """`app` under a real uvicorn, with serve's HTTP options, in a thread; yields its port."""
    import uvicorn

    from falconet.server.timeouts import uvicorn_options

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(app, log_level="critical", lifespan="off",
                            **uvicorn_options(head_timeout=5, keep_alive=keep_alive))  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + T
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(T)
        sock.close()


def tiny_app():
    import falconet
    from falconet.engine import Engine
    from falconet.server.app import create_app

    return create_app(Engine.from_llm(falconet.load(), max_batch=1), MODEL)


def test_unexpected_error_says_connection_close():
    """No request reaches an unhandled exception in the real routes, so one is added
    here: the real app and engine under a real uvicorn."""
    app = tiny_app()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("injected fault")

    with (
        uvicorn_thread(app, keep_alive=5) as port,
        socket.create_connection(("127.0.0.1", port)) as c,
    ):
        c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: falconet\r\n\r\n"  # kept alive
                  b"GET /boom HTTP/1.1\r\nHost: falconet\r\n\r\n")  # fmt: skip
        answer = read_until_closed(c)
    first, _, second = answer.partition(b"HTTP/1.1 500 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower()
    headers, _, payload = second.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower(), answer
    assert httpx.Response(500, content=payload).json()["error"]["code"] == "internal_error"


def test_idle_keep_alive_connection_is_closed():
    with (
        uvicorn_thread(tiny_app(), keep_alive=1) as port,
        socket.create_connection(("127.0.0.1", port)) as c,
    ):
        c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: falconet\r\n\r\n")
        answer = read_until_closed(c)  # one answer, then the server hangs up
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" not in answer.lower()


# --- flags -------------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--timeout-header", "soon"], "--timeout-header"),
    (["--timeout-header", "0"], "--timeout-header"),
    (["--timeout-body", "-1"], "--timeout-body"),
    (["--timeout-body", "nan"], "--timeout-body"),
    (["--timeout-keep-alive", "inf"], "--timeout-keep-alive"),
])  # fmt: skip
def test_bad_timeout_flags(flags, needle):
    res = subprocess.run([sys.executable, "-m", "falconet", "serve", *flags],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_cli_error(res, needle)
