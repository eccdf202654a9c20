"""`falconet serve` end to end: real server processes on the embedded falconet-tiny model,
driven by the official `openai` client and raw httpx."""

from __future__ import annotations

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
CONTEXT = 256  # falconet-tiny's max_position_embeddings
API_KEY = "test-key-123"
T = 120  # client timeout: only there so a broken server cannot hang the suite

PROMPTS = ["In the beginning", "And God said", "Blessed are the", "The LORD is my",
           "And it came to pass", "Thou shalt not", "For God so loved", "Let there be",
           "And Moses said", "Hear, O Israel", "The heavens declare", "Behold, I send",
           "Now the serpent", "And Jesus answered", "Praise ye the LORD", "Wisdom hath"]  # fmt: skip


@pytest.fixture(scope="module")
def servers():
    """Three servers, started together so their start-up overlaps."""
    procs = {
        "main": ServerProcess("--max-batch", "16"),
        "key": ServerProcess("--max-batch", "2", env={"FALCONET_API_KEY": API_KEY}),
        "queue": ServerProcess("--max-batch", "1", "--max-queue", "1"),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.openai_client(T)


def post(server: ServerProcess, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, timeout=T, **kw)
    return httpx.post(f"{server.url}{path}", json=body, timeout=T, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def token_count(server: ServerProcess, **body) -> int:
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == len(r.json()["tokens"])
    return r.json()["count"]


# --- models, tokenizer -----------------------------------------------------------------


def test_models_health_and_tokenizer(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    card = httpx.get(f"{server.url}/v1/models", timeout=T).json()["data"][0]
    assert card["max_model_len"] == CONTEXT
    assert httpx.get(f"{server.url}/health", timeout=T).json() == {"status": "ok"}
    r = post(server, "/tokenize", {"prompt": "And God said"}).json()
    assert r["max_model_len"] == CONTEXT and r["count"] == len(r["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "And God said"}
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > r["count"] - 3  # the template adds its own text


# --- completions and chat, streamed and not ----------------------------------------


def test_completion_stream_matches_non_stream(server, client):
    kw = dict(model=MODEL, prompt="And God said", max_tokens=24, temperature=0)
    full = client.completions.create(**kw, logprobs=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    n_prompt = token_count(server, prompt="And God said")
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == 24 == len(choice.logprobs.tokens)
    assert full.usage.total_tokens == n_prompt + 24
    assert "".join(choice.logprobs.tokens) == choice.text

    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_matches_non_stream(server, client):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Who made the heaven and the earth?"}]  # fmt: skip
    kw = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.prompt_tokens == token_count(server, messages=messages)

    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_default_max_tokens_is_the_rest_of_the_context(server, client):
    words = 1
    while token_count(server, messages=[{"role": "user", "content": "And " * words}]) < 250:
        words += 10 if words < 200 else 1
    messages = [{"role": "user", "content": "And " * words}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.prompt_tokens >= 250
    assert r.usage.total_tokens <= CONTEXT
    if r.choices[0].finish_reason == "length":  # the fallback template's "\nUser:" may stop it
        assert r.usage.total_tokens == CONTEXT


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stop_string(server, client, chat):
    def run(stream: bool, **extra):
        if chat:
            kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell of Moses."}],
                      max_tokens=32, temperature=0, **extra)  # fmt: skip
            if not stream:
                c = client.chat.completions.create(**kw).choices[0]
                return c.message.content, c.finish_reason
            chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            kw = dict(model=MODEL, prompt="And Moses said", max_tokens=32, temperature=0, **extra)
            if not stream:
                c = client.completions.create(**kw).choices[0]
                return c.text, c.finish_reason
            chunks = list(client.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
        return text, chunks[-1].choices[0].finish_reason

    free, _ = run(False)
    # a stop string that really occurs in the greedy output, not at its very start
    words = [w for w in free.split() if len(w) >= 3 and free.index(w) > 0]
    assert words, free
    stop = words[len(words) // 2]
    expected = free[: free.index(stop)]
    for stream in (False, True):
        text, finish = run(stream, stop=[stop, "never-in-the-bible"])
        assert finish == "stop"
        assert text == expected and stop not in text


def test_n_with_seed_is_reproducible(server, client):
    kw = dict(model=MODEL, prompt="And it came to pass", max_tokens=12, temperature=1.0,
              n=2, seed=1234)  # fmt: skip
    first = [c.text for c in client.completions.create(**kw).choices]
    again = client.completions.create(**kw)
    assert [c.index for c in again.choices] == [0, 1]
    assert [c.text for c in again.choices] == first
    # choice i draws from seed + i, so choice 1 is the single sample with seed 1235
    single = client.completions.create(**{**kw, "n": 1, "seed": 1235})
    assert single.choices[0].text == first[1]
    # and the streamed choices are the same samples
    streamed = ["", ""]
    for c in client.completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == first
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Sing."}], max_tokens=8,
                temperature=1.0, n=2, seed=7)  # fmt: skip
    a = [c.message.content for c in client.chat.completions.create(**chat).choices]
    assert [c.message.content for c in client.chat.completions.create(**chat).choices] == a


def test_several_prompts_in_one_completion(server, client):
    r = client.completions.create(model=MODEL, prompt=["Let there be", [9, 10, 12]],
                                  max_tokens=6, temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    alone = client.completions.create(model=MODEL, prompt="Let there be", max_tokens=6,
                                      temperature=0)  # fmt: skip
    assert r.choices[0].text == alone.choices[0].text
    assert r.usage.prompt_tokens == token_count(server, prompt="Let there be") + 3


def test_logprobs(server, client):
    r = client.completions.create(model=MODEL, prompt="The LORD is my", max_tokens=5,
                                  temperature=0, logprobs=3)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and tok in top and len(top) in (3, 4)
        assert value == max(top.values())  # greedy picks the most likely token

    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    raw = b"".join(bytes(e.bytes) for e in content).decode()
    assert raw.startswith(c.choices[0].message.content)  # + a final eos token, if any
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob
               for e in content)  # fmt: skip
    streamed = [e for ch in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, stream=True) if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_logit_bias(server, client):
    """OpenAI's logit_bias, through the official client: +100 forces a token, -100 bans
    one, and a biased request answers what the library answers with the same bias, alone
    or beside other requests in the engine's batch."""
    import falconet

    llm = falconet.load()
    prompt = "The LORD is my"
    greedy = llm.complete([prompt], max_tokens=6, temperature=0, ignore_eos=True)[0].token_ids
    forced = post(server, "/tokenize", {"prompt": " light"}).json()["tokens"][-1]
    cases = [
        {"logit_bias": {str(forced): 100}},
        {"logit_bias": {str(greedy[0]): -100, str(greedy[1]): -100}},
        {"logit_bias": {str(greedy[0]): 2.5, "7": -1.25}, "temperature": 1.0, "seed": 11},
    ]

    def library(case: dict) -> str:
        kw = {"temperature": 0.0, **case}
        kw["logit_bias"] = {int(k): v for k, v in case["logit_bias"].items()}
        return llm.complete([prompt], max_tokens=6, ignore_eos=True, **kw)[0].text

    def served(case: dict) -> str:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                      extra_body={"ignore_eos": True},
                                      **{"temperature": 0.0, **case})  # fmt: skip
        return r.choices[0].text

    want = [library(c) for c in cases]
    assert want[0] == llm.tokenizer.decode([forced] * 6)
    assert llm.complete([prompt], max_tokens=6, temperature=0, ignore_eos=True,
                        logit_bias={greedy[0]: -100})[0].token_ids[0] != greedy[0]  # fmt: skip
    assert [served(c) for c in cases] == want
    with ThreadPoolExecutor(6) as pool:  # batched with each other and with unbiased requests
        together = list(pool.map(served, [*cases, *([{"logit_bias": {}}] * 3)]))
    assert together[:3] == want
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                          logit_bias={str(forced): 100})  # fmt: skip
    assert chat.choices[0].message.content == llm.tokenizer.decode([forced] * 4)


def test_embeddings_default_model(client):
    """/v1/embeddings on a server started without --embedding-model: the packaged
    all-MiniLM-L6-v2 under its hub name (tests/test_server_embeddings.py goes further)."""
    from sentence_transformers import SentenceTransformer

    from falconet.rag.embed import packaged_model_path

    texts = ["In the beginning God created the heaven and the earth.", "Let there be light"]
    r = client.embeddings.create(model=EMBEDDER, input=texts)
    assert r.model == EMBEDDER and [d.index for d in r.data] == [0, 1]
    want = SentenceTransformer(str(packaged_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    for d, w in zip(r.data, want, strict=True):
        assert len(d.embedding) == 384
        assert float(sum(a * b for a, b in zip(d.embedding, w, strict=True))) > 0.9999
    short = client.embeddings.create(model="all-MiniLM-L6-v2", input="x", encoding_format="float")
    assert short.model == EMBEDDER and short.usage.prompt_tokens == 3  # [CLS] x [SEP]


# --- concurrency, disconnects, backpressure ----------------------------------------


def test_concurrent_streams_match_sequential(server, client):
    def alone(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                         temperature=0).choices[0].text  # fmt: skip

    def streamed(prompt: str) -> tuple[str, str]:
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                                temperature=0, stream=True))  # fmt: skip
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    sequential = [alone(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(streamed, PROMPTS))
    assert [t for t, _ in together] == sequential
    assert all(f in ("length", "stop") for _, f in together)


def test_client_disconnect_frees_the_slot(server, client):
    before = metric(httpx.get(f"{server.url}/metrics", timeout=T).text,
                    "falconet_client_disconnects_total")  # fmt: skip
    body = {"prompt": "In the beginning", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.Client(timeout=T) as c, c.stream("POST", f"{server.url}/v1/completions",
                                                 json=body) as r:  # fmt: skip
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving both blocks closes the connection mid-stream
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=T).text
        gone = metric(text, "falconet_client_disconnects_total") > before
        if gone and metric(text, "falconet_sequences_running") == 0:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    r = client.completions.create(model=MODEL, prompt="And", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_queue_full_gives_429(servers):
    q = servers["queue"]
    results: dict[str, list] = {}
    running = threading.Event()

    def stream(name: str, max_tokens: int) -> None:
        body = {"prompt": "And", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{q.url}/v1/completions", json=body, timeout=T) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    running.set()
            results[name] = [r.status_code, sse_events(lines)]

    long = threading.Thread(target=stream, args=("long", 250))  # 1 + 250 tokens: nearly the context
    long.start()
    assert running.wait(T)  # the long request has its first token: it holds the one slot
    queued = threading.Thread(target=stream, args=("queued", 4))
    queued.start()
    deadline = time.monotonic() + T
    while metric(httpx.get(f"{q.url}/metrics", timeout=T).text, "falconet_sequences_waiting") < 1:
        assert time.monotonic() < deadline and long.is_alive()
        time.sleep(0.02)
    r = post(q, "/v1/completions", {"prompt": "And", "max_tokens": 4})
    err = assert_openai_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1 and err["code"] == "queue_full"
    long.join(5 * T)
    queued.join(5 * T)
    for name, tokens in (("long", 250), ("queued", 4)):
        status, events = results[name]
        assert status == 200 and events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1])
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert events[-2]["usage"]["completion_tokens"] == tokens


# --- bad requests ------------------------------------------------------------------

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
EMBED = "/v1/embeddings"
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged default
USER = [{"role": "user", "content": "hi"}]
SIGN_IN = "/v1/auth/session"
BAD_REQUESTS = [
    # (id, path, body, status, param)
    ("malformed json", CMPL, b'{"prompt": "x", ', 400, None),
    ("json array", CMPL, b"[1, 2]", 400, None),
    ("json string", CHAT, b'"hello"', 400, None),
    ("empty body", CMPL, b"", 400, None),
    ("invalid utf-8", CMPL, b'{"prompt": "caf\xc3\x28"}', 400, None),
    ("lone surrogate", CMPL, b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("prompt missing", CMPL, {"max_tokens": 4}, 400, "prompt"),
    ("prompt a number", CMPL, {"prompt": 5}, 400, "prompt"),
    ("prompt empty", CMPL, {"prompt": ""}, 400, "prompt"),
    ("token id outside vocab", CMPL, {"prompt": [1, 10**6]}, 400, "prompt"),
    ("max_tokens a string", CMPL, {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ("max_tokens 0", CMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("temperature a string", CMPL, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("temperature < 0", CMPL, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", CMPL, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p > 1", CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p"),
    ("n 0", CMPL, {"prompt": "x", "n": 0}, 400, "n"),
    ("n 17", CHAT, {"messages": USER, "n": 17}, 400, "n"),
    ("logprobs 21", CMPL, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs true", CMPL, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("top_logprobs 21", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("presence_penalty 3", CMPL, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty -3", CHAT, {"messages": USER, "frequency_penalty": -3}, 400,
     "frequency_penalty"),
    ("seed a float", CMPL, {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("stop a number", CMPL, {"prompt": "x", "stop": 3}, 400, "stop"),
    ("stop empty string", CMPL, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("stream a string", CMPL, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", CMPL,
     {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("top_k a float", CMPL, {"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ("min_p 2", CMPL, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("repetition_penalty 0", CMPL, {"prompt": "x", "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("ignore_eos a string", CMPL, {"prompt": "x", "ignore_eos": "no"}, 400, "ignore_eos"),
    ("stop_token_ids negative", CMPL, {"prompt": "x", "stop_token_ids": [-1]}, 400,
     "stop_token_ids"),
    ("unknown model", CMPL, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("unknown model chat", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model"),
    # echo, logprobs, prompt_logprobs, max_tokens 0 (issue 14): malformed, oversized, hostile
    ("echo a string", CMPL, {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("echo a number", CMPL, {"prompt": "x", "echo": 1}, 400, "echo"),
    ("echo an object", CMPL, {"prompt": "x", "echo": {"on": True}}, 400, "echo"),
    ("echo on chat", CHAT, {"messages": USER, "echo": True}, 400, "echo"),
    ("echo logprobs 21", CMPL, {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("echo logprobs -1", CMPL, {"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": -1},
     400, "logprobs"),
    ("echo logprobs 10**30", CMPL, {"prompt": "x", "echo": True, "logprobs": 10**30}, 400,
     "logprobs"),
    ("echo with suffix", CMPL, {"prompt": "x", "echo": True, "suffix": "y"}, 400, "suffix"),
    ("prompt_logprobs 21", CMPL, {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("prompt_logprobs -1 (all)", CMPL, {"prompt": "x", "prompt_logprobs": -1}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs 10**30", CMPL, {"prompt": "x", "prompt_logprobs": 10**30}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs a float", CMPL, {"prompt": "x", "prompt_logprobs": 1.5}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs true", CMPL, {"prompt": "x", "prompt_logprobs": True}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs a string", CMPL, {"prompt": "x", "prompt_logprobs": "5"}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs a list", CMPL, {"prompt": "x", "prompt_logprobs": [1]}, 400,
     "prompt_logprobs"),
    ("prompt_logprobs streamed", CMPL, {"prompt": "x", "prompt_logprobs": 1, "stream": True},
     400, "prompt_logprobs"),
    ("prompt_logprobs on chat", CHAT, {"messages": USER, "prompt_logprobs": 1}, 400,
     "prompt_logprobs"),
    ("max_tokens 0 with logprobs only", CMPL, {"prompt": "x", "max_tokens": 0, "logprobs": 1},
     400, "max_tokens"),
    ("max_tokens -1 with echo", CMPL, {"prompt": "x", "echo": True, "max_tokens": -1}, 400,
     "max_tokens"),
    ("max_tokens false with echo", CMPL, {"prompt": "x", "echo": True, "max_tokens": False}, 400,
     "max_tokens"),
    ("max_tokens 0.5 with echo", CMPL, {"prompt": "x", "echo": True, "max_tokens": 0.5}, 400,
     "max_tokens"),
    ("max_tokens '0' with echo", CMPL, {"prompt": "x", "echo": True, "max_tokens": "0"}, 400,
     "max_tokens"),
    ("max_completion_tokens 0 with echo", CMPL,
     {"prompt": "x", "echo": True, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("max_tokens 0 on chat", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("echo a prompt beyond the context", CMPL,
     {"prompt": [5] * (CONTEXT + 1), "echo": True, "max_tokens": 0, "logprobs": 1}, 400,
     "prompt"),
    ("echo ids outside vocab", CMPL, {"prompt": [[1, 2], [3, -1]], "echo": True, "max_tokens": 0},
     400, "prompt"),
    ("echo more prompts than batch + queue", CMPL,
     {"prompt": [[1, 2]] * 81, "echo": True, "max_tokens": 0}, 400, "prompt"),
    ("echo prompts x n beyond batch + queue", CMPL,
     {"prompt": [[1, 2]] * 41, "n": 2, "echo": True, "max_tokens": 0}, 400, "n"),
    ("add_special_tokens a string", "/tokenize", {"prompt": "x", "add_special_tokens": "no"},
     400, "add_special_tokens"),
    ("suffix", CMPL, {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    # sign-in, admin and collection fields (issue 16): checked before single-user mode's 404
    ("sign-in malformed", SIGN_IN, b'{"api_key": ', 400, None),
    ("sign-in key missing", SIGN_IN, {}, 400, "api_key"),
    ("sign-in key a number", SIGN_IN, {"api_key": 12345}, 400, "api_key"),
    ("sign-in key a list", SIGN_IN, {"api_key": ["fnk_a"]}, 400, "api_key"),
    ("sign-in key empty", SIGN_IN, {"api_key": ""}, 400, "api_key"),
    ("sign-in key 300 chars", SIGN_IN, {"api_key": "k" * 300}, 400, "api_key"),
    ("sign-in extra field", SIGN_IN, {"api_key": "k", "user": "admin"}, 400, "user"),
    ("admin user name a path", "/v1/admin/users", {"name": "../../etc/passwd"}, 400, "name"),
    ("admin user name with NUL", "/v1/admin/users", {"name": "root\x00"}, 400, "name"),
    ("admin user admin a string", "/v1/admin/users", {"name": "x", "admin": "true"}, 400,
     "admin"),
    ("admin collection name html", "/v1/admin/collections", {"name": "<b>x</b>"}, 400, "name"),
    ("rag query collection a number", "/v1/rag/query", {"query": "x", "collection": 5}, 400,
     "collection"),
    ("rag query collection 300 chars", "/v1/rag/query", {"query": "x", "collection": "c" * 300},
     400, "collection"),
    ("best_of", CMPL, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    # logit_bias: token id strings -> [-100, 100]
    ("logit_bias a list", CMPL, {"prompt": "x", "logit_bias": [[5, 10]]}, 400, "logit_bias"),
    ("logit_bias a string", CHAT, {"messages": USER, "logit_bias": "5:10"}, 400, "logit_bias"),
    ("logit_bias key not an id", CMPL, {"prompt": "x", "logit_bias": {"five": 1}}, 400,
     "logit_bias"),
    ("logit_bias key negative", CMPL, {"prompt": "x", "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ("logit_bias key 11 digits", CMPL, {"prompt": "x", "logit_bias": {"1" * 11: 1}}, 400,
     "logit_bias"),
    ("logit_bias key 5000 digits", CMPL, {"prompt": "x", "logit_bias": {"9" * 5000: 1}}, 400,
     "logit_bias"),
    ("logit_bias key outside vocab", CHAT, {"messages": USER, "logit_bias": {"999999": 1}}, 400,
     "logit_bias"),
    ("logit_bias key twice", CMPL, {"prompt": "x", "logit_bias": {"5": 1, "005": 2}}, 400,
     "logit_bias"),
    ("logit_bias 101", CMPL, {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias -100.5", CHAT, {"messages": USER, "logit_bias": {"5": -100.5}}, 400,
     "logit_bias"),
    ("logit_bias true", CMPL, {"prompt": "x", "logit_bias": {"5": True}}, 400, "logit_bias"),
    ("logit_bias a string bias", CMPL, {"prompt": "x", "logit_bias": {"5": "10"}}, 400,
     "logit_bias"),
    ("logit_bias nested", CMPL, {"prompt": "x", "logit_bias": {"5": {"5": 1}}}, 400, "logit_bias"),
    ("logit_bias 1025 entries", CMPL,
     {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias"),
    ("logit_bias 5000 digits", CMPL,
     b'{"prompt": "x", "logit_bias": {"5": ' + b"9" * 5000 + b"}}", 400, "logit_bias"),
    ("logit_bias NaN", CMPL, b'{"prompt": "x", "logit_bias": {"5": NaN}}', 400, "logit_bias"),
    # integers past Python's 4300-digit int/str limit, and a list where a string goes
    ("max_tokens 5000 digits", CMPL, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "max_tokens"),
    ("n 5000 digits", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "n": -'
     + b"9" * 5000 + b"}", 400, "n"),
    ("prompt id 5000 digits", CMPL, b'{"prompt": [1, ' + b"9" * 5000 + b"]}", 400, "prompt"),
    ("seed 5000 digits", CMPL, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "seed"),
    ("detokenize id 5000 digits", "/detokenize", b'{"tokens": [' + b"9" * 5000 + b"]}", 400,
     "tokens"),
    ("max_tokens 4000 digits", CMPL, {"prompt": "x", "max_tokens": 10**3999}, 400, "max_tokens"),
    ("role a list", CHAT, {"messages": [{"role": [], "content": "hi"}]}, 400, "messages[0].role"),
    ("role an object", CHAT, {"messages": [{"role": {}, "content": "hi"}]}, 400,
     "messages[0].role"),
    ("tokenize role a list", "/tokenize", {"messages": [{"role": [], "content": "hi"}]}, 400,
     "messages[0].role"),
    # /v1/embeddings
    ("embeddings input missing", EMBED, {"model": EMBEDDER}, 400, "input"),
    ("embeddings input null", EMBED, {"input": None}, 400, "input"),
    ("embeddings input empty", EMBED, {"input": ""}, 400, "input"),
    ("embeddings input []", EMBED, {"input": []}, 400, "input"),
    ("embeddings an empty item", EMBED, {"input": ["a", ""]}, 400, "input"),
    ("embeddings an empty id list", EMBED, {"input": [[1], []]}, 400, "input"),
    ("embeddings text and ids", EMBED, {"input": ["a", [1]]}, 400, "input"),
    ("embeddings input a number", EMBED, {"input": 5}, 400, "input"),
    ("embeddings input an object", EMBED, {"input": {"text": "a"}}, 400, "input"),
    ("embeddings 2049 inputs", EMBED, {"input": ["a"] * 2049}, 400, "input"),
    ("embeddings lone surrogate", EMBED, b'{"input": ["\\udc80"]}', 400, "input"),
    ("embeddings id outside vocab", EMBED, {"input": [1, 10**6]}, 400, "input"),
    ("embeddings id negative", EMBED, {"input": [[1, -1]]}, 400, "input"),
    ("embeddings id 5000 digits", EMBED, b'{"input": [1, ' + b"9" * 5000 + b"]}", 400, "input"),
    ("embeddings too many tokens", EMBED, {"input": "word " * 300}, 400, "input"),
    ("embeddings encoding hex", EMBED, {"input": "a", "encoding_format": "hex"}, 400,
     "encoding_format"),
    ("embeddings encoding a list", EMBED, {"input": "a", "encoding_format": ["float"]}, 400,
     "encoding_format"),
    ("embeddings dimensions 3", EMBED, {"input": "a", "dimensions": 3}, 400, "dimensions"),
    ("embeddings dimensions 0", EMBED, {"input": "a", "dimensions": 0}, 400, "dimensions"),
    ("embeddings dimensions a string", EMBED, {"input": "a", "dimensions": "384"}, 400,
     "dimensions"),
    ("embeddings unknown model", EMBED, {"input": "a", "model": "text-embedding-3-small"}, 404,
     "model"),
    ("embeddings model a number", EMBED, {"input": "a", "model": 3}, 400, "model"),
    ("tools not an array", CHAT, {"messages": USER, "tools": {"name": "f"}}, 400, "tools"),
    ("tools too many", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, 400, "tools"),
    ("tool type not function", CHAT, {"messages": USER, "tools": [
        {"type": "code_interpreter", "function": {"name": "f"}}]}, 400, "tools[0].type"),
    ("tool name hostile", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f(); rm -rf /"}}]}, 400,
     "tools[0].function.name"),
    ("tool names twice", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}] * 2}, 400, "tools"),
    ("tool parameters not a schema", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "{"}}]}, 400,
     "tools[0].function.parameters"),
    ("tool_choice unknown", CHAT, {"messages": USER, "tool_choice": "always"}, 400, "tool_choice"),
    ("tool_choice required without tools", CHAT, {"messages": USER, "tool_choice": "required"},
     400, "tool_choice"),
    ("tool_choice names a missing function", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("parallel_tool_calls a string", CHAT, {"messages": USER, "parallel_tool_calls": "yes"}, 400,
     "parallel_tool_calls"),
    ("tool message without tool_call_id", CHAT,
     {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].tool_call_id"),
    ("tool_calls on a user message", CHAT, {"messages": [{"role": "user", "content": "hi",
     "tool_calls": []}]}, 400, "messages[0].tool_calls"),
    ("tool call arguments not text", CHAT, {"messages": [{"role": "assistant", "content": None,
     "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}]},
     400, "messages[0].tool_calls[0].function.arguments"),
    ("response_format unknown type", CHAT, {"messages": USER, "response_format": {"type": "xml"}},
     400, "response_format.type"),
    ("response_format a string", CHAT, {"messages": USER, "response_format": "json"}, 400,
     "response_format"),
    ("response_format json_schema missing", CMPL,
     {"prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("json_schema name missing", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("json_schema name hostile", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "../../etc/passwd", "schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("json_schema name too long", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n" * 65, "schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("json_schema schema an array", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}}, 400,
     "response_format.json_schema.schema"),
    ("json_schema invalid schema", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 5}}}}, 400,
     "response_format"),
    ("guided_json not json", CMPL, {"prompt": "x", "guided_json": "{oops"}, 400, "guided_json"),
    ("guided_json a number", CMPL, {"prompt": "x", "guided_json": 5}, 400, "guided_json"),
    ("guided_json oversized", CMPL, {"prompt": "x", "guided_json": {"description": "d" * 70000}},
     400, "guided_json"),
    ("guided_regex empty", CMPL, {"prompt": "x", "guided_regex": ""}, 400, "guided_regex"),
    ("guided_regex a list", CMPL, {"prompt": "x", "guided_regex": ["a"]}, 400, "guided_regex"),
    ("guided_regex oversized", CMPL, {"prompt": "x", "guided_regex": "a" * 70000}, 400,
     "guided_regex"),
    ("guided_regex invalid", CHAT, {"messages": USER, "guided_regex": "(a"}, 400, "guided_regex"),
    ("guided_regex lone surrogate", CMPL, b'{"prompt": "x", "guided_regex": "\\ud800"}', 400,
     "guided_regex"),
    ("guided_grammar invalid", CMPL, {"prompt": "x", "guided_grammar": "start: ("}, 400,
     "guided_grammar"),
    ("guided_grammar a number", CMPL, {"prompt": "x", "guided_grammar": 1}, 400, "guided_grammar"),
    ("guided_choice empty", CMPL, {"prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ("guided_choice numbers", CMPL, {"prompt": "x", "guided_choice": [1, 2]}, 400,
     "guided_choice"),
    ("guided_choice too many", CMPL, {"prompt": "x", "guided_choice": ["a"] * 257}, 400,
     "guided_choice"),
    ("two constraints", CHAT, {"messages": USER, "response_format": {"type": "json_object"},
                               "guided_regex": "a+"}, 400, "guided_regex"),
    ("constraint with ignore_eos", CMPL, {"prompt": "x", "ignore_eos": True,
                                          "guided_choice": ["a"]}, 400, "guided_choice"),
    ("messages missing", CHAT, {"max_tokens": 3}, 400, "messages"),
    ("messages empty", CHAT, {"messages": []}, 400, "messages"),
    ("messages a string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("message not an object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("content null", CHAT, {"messages": [{"role": "user", "content": None}]}, 400,
     "messages[0].content"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content"),
    ("tokenize nothing", "/tokenize", {}, 400, "prompt"),
    ("detokenize bad ids", "/detokenize", {"tokens": [1, "a"]}, 400, "tokens"),
    ("detokenize outside vocab", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])  # fmt: skip
def test_bad_request(server, path, body, status, param):
    err = assert_openai_error(post(server, path, body), status, param)
    if param is not None:
        assert param.split("[")[0].split(".")[0] in err["message"]


@pytest.mark.parametrize("path,body", [
    (CMPL, {"prompt": "And", "max_tokens": 1000}),
    (CMPL, {"prompt": "And " * 300}),
    (CHAT, {"messages": USER, "max_completion_tokens": 300}),
    (CHAT, {"messages": [{"role": "user", "content": "And " * 300}]}),
])  # fmt: skip
def test_beyond_the_context(server, path, body):
    err = assert_openai_error(post(server, path, body), 400)
    assert err["code"] == "context_length_exceeded"
    assert str(CONTEXT) in err["message"]
    asked = body.get("max_tokens", body.get("max_completion_tokens"))
    if asked is not None:
        assert str(asked) in err["message"]
    prompt_tokens = (token_count(server, prompt=body["prompt"]) if "prompt" in body
                     else token_count(server, messages=body["messages"]))  # fmt: skip
    assert str(prompt_tokens) in err["message"]


def test_oversized_body_is_413(server):
    body = b'{"prompt": "' + b"a" * (10 * 2**20) + b'"}'
    assert_openai_error(post(server, CMPL, body), 413)


def test_routes_and_methods(server):
    assert_openai_error(httpx.get(f"{server.url}/v2/nothing", timeout=T), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/completions", timeout=T), 405)
    assert_openai_error(httpx.get(f"{server.url}/v1/models/gpt-4", timeout=T), 404, "model")


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)


def test_still_serving_after_bad_requests(server, client):
    assert httpx.get(f"{server.url}/health", timeout=T).json() == {"status": "ok"}
    r = client.completions.create(model=MODEL, prompt="And", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    text = httpx.get(f"{server.url}/metrics", timeout=T).text
    assert 'falconet_http_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert metric(text, "falconet_generation_tokens_total") > 0
    assert metric(text, "falconet_time_to_first_token_seconds_count") > 0
    assert metric(text, "falconet_inter_token_latency_seconds_count") > 0


# --- API key -----------------------------------------------------------------------


def test_api_key(servers):
    s = servers["key"]
    assert httpx.get(f"{s.url}/health", timeout=T).status_code == 200  # open for probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(s, CMPL, {"prompt": "x", "max_tokens": 2}, headers=headers)
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert_openai_error(httpx.get(f"{s.url}/v1/models", headers=headers, timeout=T), 401)
        assert_openai_error(httpx.get(f"{s.url}/metrics", headers=headers, timeout=T), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{s.url}/v1", api_key=API_KEY, timeout=T, max_retries=0)
    r = good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_sigterm_shuts_down_cleanly(servers):
    s = servers["key"]
    assert s.stop() == 0
    assert s.lines[-1] == "falconet: server stopped", s.lines


# --- the error paths inside the server ---------------------------------------------


def test_internal_errors_are_openai_shaped(monkeypatch):
    """An unexpected exception -> 500 in OpenAI's shape; an engine failure mid-stream ->
    an error event, then [DONE]. In-process, with a fault injected into the real engine."""
    import asyncio

    import falconet
    from falconet.engine import Engine
    from falconet.server.app import create_app

    engine = Engine.from_llm(falconet.load(), max_batch=2)
    app = create_app(engine, MODEL)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("broken object at 0x7f3a5c2b1d90")

    forward, steps = engine.model.forward_packed, [0]

    def failing_forward(*args, **kwargs):
        steps[0] += 1
        if steps[0] > 3:
            raise RuntimeError("injected fault at 0x7f3a5c2b1d90")
        return forward(*args, **kwargs)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://falconet") as c:
            err = assert_openai_error(await c.get("/boom"), 500)
            assert "0x7f3a" not in err["message"] and err["type"] == "server_error"

            monkeypatch.setattr(engine.model, "forward_packed", failing_forward)
            body = {"prompt": "And God said", "max_tokens": 10, "temperature": 0}
            r = await c.post(CMPL, json={**body, "stream": True})
            events = sse_events(r.text.splitlines())
            assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
            assert events[-2]["error"]["type"] == "server_error"
            assert "injected fault" in events[-2]["error"]["message"]
            assert "0x7f3a" not in events[-2]["error"]["message"]
            assert all("choices" in e for e in events[:-2])

            err = assert_openai_error(await c.post(CMPL, json=body), 500)
            assert "injected fault" in err["message"]
            assert (await c.get("/health")).json() == {"status": "ok"}  # the engine lives on

    engine.start()
    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


# --- the command line --------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--port", "70000"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--embedding-model", "/no/such/folder"], "--embedding-model"),
])  # fmt: skip
def test_serve_bad_flags(flags, needle):
    res = subprocess.run([sys.executable, "-m", "falconet", "serve", *flags],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_cli_error(res, needle)


def test_serve_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "falconet", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_cli_error(res, "cannot listen")
