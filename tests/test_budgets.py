"""Answer lengths that fit the model: every face's default max_tokens is its cap or what
the context leaves after the prompt, whichever is less, also on the embedded
falconet-tiny's 256-token context; `falconet chat` with no --model (the answering
falconet-tiny-instruct) starts and answers in a real terminal; an explicit
length that does not fit is a clear error."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import httpx
import pytest

import falconet
from falconet.cli.generate import chat_turn
from falconet.engine import Engine
from falconet.errors import GenerationError, RagError
from falconet.rag.answer import answer_tokens, build_prompt, stream_answer
from falconet.rag.store import Hit
from falconet.request_rules import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    RAG_MAX_TOKENS,
    default_max_tokens,
)
from falconet.sampling import SamplingParams
from tests.server_tools import ServerProcess

T = 120
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
PASSAGE = (
    "And Cain talked with Abel his brother: and it came to pass, when they were in the "
    "field, that Cain rose up against Abel his brother, and slew him. "
)


@pytest.fixture(scope="module")
def llm():
    return falconet.load()


def test_default_is_the_cap_or_what_the_context_leaves():
    assert default_max_tokens(256, 256, 20) == 236  # the context is the smaller
    assert default_max_tokens(16, 2048, 20) == 16  # the cap is
    assert default_max_tokens(None, 256, 255) == 1  # no cap: up to the context
    with pytest.raises(GenerationError, match="256-token context"):
        default_max_tokens(16, 256, 256)


def test_chat_reply_fits_the_embedded_model(llm):
    context = llm.config.max_position_embeddings
    assert context < CHAT_MAX_TOKENS + 1  # the case that broke: a cap as large as the context
    ids, length = chat_turn(llm, None, [{"role": "user", "content": "hello"}], context, None)
    assert ids == llm.chat_prompt([{"role": "user", "content": "hello"}])
    assert length == context - len(ids)
    # a long history is trimmed so that a reply of half the context fits
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i} " * 3}]  # fmt: skip
    history.append({"role": "user", "content": "last"})
    ids, length = chat_turn(llm, "be brief", history, context, None)
    assert len(ids) <= context - context // 2 and length == context - len(ids)
    assert history[-1] == {"role": "user", "content": "last"} and len(history) < 81
    # one message longer than that still gets an answer while it leaves room
    words = " ".join(["light"] * 400)
    n = next(k for k in range(400, 0, -1)
             if len(llm.chat_prompt([{"role": "user", "content": " ".join(words.split()[:k])}]))
             < context)  # fmt: skip
    message = {"role": "user", "content": " ".join(words.split()[:n])}
    ids, length = chat_turn(llm, None, [message], context, None)
    assert len(ids) > context // 2 and length == context - len(ids) >= 1
    with pytest.raises(GenerationError, match="shorter message"):
        chat_turn(llm, None, [{"role": "user", "content": words}], context, None)
    # an explicit length is kept as asked
    ids, length = chat_turn(llm, None, [{"role": "user", "content": "hi"}], context, 7)
    assert length == 7


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = T) -> bytes:
    """Terminal output up to and including the next `needle` after what was seen."""
    start = len(seen)
    deadline = time.monotonic() + timeout
    while needle not in seen[start:]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} in the terminal after {timeout}s: {bytes(seen)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {needle!r}: {bytes(seen)!r}")
            seen += chunk
    end = seen.index(needle, start) + len(needle)
    return bytes(seen[start:end])


def test_chat_without_a_model_answers_in_a_terminal():
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "falconet", "chat"], stdin=child,
                            stdout=child, stderr=child, env=ENV, start_new_session=True)  # fmt: skip
    os.close(child)
    seen = bytearray()
    try:
        _read_until(main, b"you> ", seen)
        assert b"falconet-tiny-instruct" in seen  # chat's default: the answering model
        os.write(main, b"How much notice must the tenant give?\n")
        _read_until(main, b"falcon> ", seen)
        reply = _read_until(main, b"you> ", seen)[: -len(b"you> ")]
        assert reply.decode("utf-8").strip(), bytes(seen)
        assert b"error" not in seen and b"leaves no room" not in seen
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_chat_keeps_an_explicit_length_that_does_not_fit_an_error(llm):
    context = llm.config.max_position_embeddings
    res = subprocess.run([sys.executable, "-m", "falconet", "chat", "-m", "falconet-tiny",
                          "--max-tokens", str(context)],
                         input="hello\n", capture_output=True, text=True, timeout=T, env=ENV)  # fmt: skip
    assert res.returncode == 2
    assert f"--max-tokens {context} leaves no room" in res.stderr


def _hits(n: int) -> list[Hit]:
    return [Hit(f"c{i}", f"d{i}", f"/docs/doc-{i}.txt", i, PASSAGE * 4, 0, 10, None, None,
                1.0 / (i + 1)) for i in range(n)]  # fmt: skip


def test_rag_answer_default_fits_the_prompt(llm):
    engine = Engine.from_llm(llm)
    context = engine.max_context
    question = "Who slew Abel?"
    ids, sources = build_prompt(llm.tokenizer, question, _hits(5), context, None)
    length = answer_tokens(context, len(ids), None)
    assert len(sources) >= 2 and len(ids) + length <= context
    assert length == min(RAG_MAX_TOKENS, context - len(ids))
    bare, _ = build_prompt(llm.tokenizer, question, [], context, None)
    assert length >= min(RAG_MAX_TOKENS, (context - len(bare)) // 4)  # what was reserved
    params = SamplingParams(max_tokens=1, ignore_eos=True)  # the 1 is replaced
    got, pieces = stream_answer(engine, question, _hits(5), params, default_length=True)
    text = "".join(pieces)
    assert got == sources
    [alone] = engine.generate([ids], [SamplingParams(max_tokens=length, ignore_eos=True)])
    assert text == alone.text and len(alone.token_ids) == length
    with pytest.raises(RagError, match="fills the model's"):
        build_prompt(llm.tokenizer, "why " * 300, _hits(1), context, None)
    with pytest.raises(RagError, match="lower --max-tokens"):
        build_prompt(llm.tokenizer, question, _hits(1), context, context)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("budget-store")
    docs = tmp_path_factory.mktemp("budget-docs")
    (docs / "cain.txt").write_text(PASSAGE * 6)
    with ServerProcess("--rag-store", str(store), "--rag-root", str(docs), env=ENV) as s:
        r = httpx.post(f"{s.url}/v1/rag/documents", json={"path": str(docs)}, timeout=T)
        assert r.status_code == 200, r.text
        yield s


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=T)


def test_server_defaults_fit_the_context(server, llm):
    context = httpx.get(f"{server.url}/v1/models", timeout=T).json()["data"][0]["max_model_len"]
    ids = llm.tokenizer.encode("In the beginning")
    # completions: OpenAI's 16 when it fits, what is left when it does not
    r = _post(server, "/v1/completions", {"prompt": ids, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == COMPLETION_MAX_TOKENS
    long = (ids * context)[: context - 5]
    r = _post(server, "/v1/completions", {"prompt": long, "ignore_eos": True, "max_tokens": None})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # an explicit max_tokens that does not fit stays an error, as OpenAI's
    r = _post(server, "/v1/completions", {"prompt": long, "max_tokens": COMPLETION_MAX_TOKENS})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"
    r = _post(server, "/v1/completions", {"prompt": (ids * context)[:context]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # chat: absent means up to the context
    messages = [{"role": "user", "content": "hello"}]
    r = _post(server, "/v1/chat/completions", {"messages": messages, "ignore_eos": True})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] == context
    # RAG: up to RAG_MAX_TOKENS, what the passages leave
    r = _post(server, "/v1/rag/query", {"query": "Who slew Abel?", "ignore_eos": True})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["completion_tokens"] == min(RAG_MAX_TOKENS, context - u["prompt_tokens"])
    assert u["prompt_tokens"] + u["completion_tokens"] <= context
    r = _post(server, "/v1/rag/query", {"query": "Who slew Abel?", "max_tokens": context})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_rag_ask_without_a_length_answers_on_the_embedded_model(tmp_path):
    (tmp_path / "cain.txt").write_text(PASSAGE)

    def rag(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "falconet", "rag", *args, "--store",
                               str(tmp_path / "store")], capture_output=True, text=True,
                              timeout=T, env=ENV)  # fmt: skip

    assert rag("ingest", str(tmp_path / "cain.txt")).returncode == 0
    res = rag("ask", "Who slew Abel?")
    assert res.returncode == 0, res.stderr
    answer, sources = res.stdout.split("\n\nSources:\n")
    assert answer.strip() and sources.startswith(f"[1] {tmp_path / 'cain.txt'}")
    # the answering model's 2,048 positions leave no room for a 2,048-token answer
    res = rag("ask", "Who slew Abel?", "--max-tokens", "2048")
    assert res.returncode == 2 and "lower --max-tokens" in res.stderr
