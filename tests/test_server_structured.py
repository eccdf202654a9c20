"""Structured output through a real `falconet serve` (falconet-tiny, a random-ish tiny
model) and the official openai client: JSON-schema output parses and validates
(python-jsonschema) for 20 schemas generated here; json_object, guided_regex,
guided_choice and guided_grammar (Lark and GBNF) hold on both routes; streamed output
joins to the non-streamed one.

The tiny model does not want to write JSON, so it is a hard client: only the grammar
keeps it on track. Every generated schema bounds its output (strings by maxLength,
integers by minimum/maximum, arrays by maxItems, objects by additionalProperties: false),
and max_tokens covers the longest output the schema allows, so the grammar always
reaches its end and every answer must finish with "stop".
"""

from __future__ import annotations

import json
import random
import re
import string
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.server_tools import ServerProcess, sse_events

T = 300  # client timeout: only there so a broken server cannot hang the suite
CONTEXT = 256  # falconet-tiny's
MODEL = "falconet-tiny"
USER = [{"role": "user", "content": "Answer in JSON."}]
# Bytes one string character can take in the output: a JSON escape such as \u001f.
BYTES_PER_CHAR = 6


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--max-batch", "20", env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.openai_client(T)


# --- random schemas --------------------------------------------------------------------


def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "boolean", "enum", "null"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 1), "maxLength": rng.randint(1, 4)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "enum":
        pool = ["red", "green", "a b", 'q"t', 7, -1, True, None]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    return {"type": kind}


def _schema(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["scalar", "scalar", "array", "object"] if depth < 2 else ["scalar"])
    if kind == "array":
        low = rng.randint(0, 1)
        return {"type": "array", "items": _schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}  # fmt: skip
    if kind == "object":
        return _object(rng, depth)
    return _scalar(rng)


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "tags", "kind", "size", "ok", "owner", "x_y"],
                       rng.randint(1, 3 if depth else 4))  # fmt: skip
    props = {n: _schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}  # fmt: skip


def longest(schema: dict) -> int:
    """An upper bound on the bytes of any compact JSON value `schema` allows."""
    if "enum" in schema:
        return max(len(json.dumps(v).encode()) for v in schema["enum"])
    kind = schema["type"]
    if kind == "string":
        return 2 + BYTES_PER_CHAR * schema["maxLength"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind in ("boolean", "null"):
        return 5
    if kind == "array":
        return 2 + schema["maxItems"] * (longest(schema["items"]) + 2)
    props = schema["properties"]  # ", " between members, '"key": ' before each value
    return 2 + sum(len(k) + 4 + longest(v) + 2 for k, v in props.items())


def random_schemas(count: int, budget: int, seed: int = 14) -> list[dict]:
    """`count` object schemas whose longest output fits `budget` bytes."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        schema = _object(rng, 0)
        if longest(schema) <= budget:
            out.append(schema)
    return out


def chat_budget(server: ServerProcess) -> int:
    r = httpx.post(f"{server.url}/tokenize", json={"messages": USER}, timeout=T)
    return CONTEXT - r.json()["count"]


# --- JSON schema -----------------------------------------------------------------------


def test_random_schemas_validate(server, client):
    max_tokens = chat_budget(server)
    schemas = random_schemas(20, budget=max_tokens - 1)  # a token holds at least one byte
    assert any(s["properties"] and any(v.get("type") == "object" for v in s["properties"].values())
               for s in schemas)  # nested objects are among them # fmt: skip
    assert any("enum" in json.dumps(s) for s in schemas)

    def ask(i: int):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}
        # half greedy, half sampled: the sampled ones wander more
        return client.chat.completions.create(
            model=MODEL, messages=USER, response_format=fmt, max_tokens=max_tokens,
            temperature=0 if i % 2 else 1.0, seed=i,
        )  # fmt: skip

    with ThreadPoolExecutor(len(schemas)) as pool:
        answers = list(pool.map(ask, range(len(schemas))))
    for schema, answer in zip(schemas, answers, strict=True):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        value = json.loads(choice.message.content)
        jsonschema.validate(value, schema)


def test_schema_on_completions_and_guided_json(server, client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
              "maximum": 9}, "w": {"enum": ["yes", "no"]}}, "required": ["n", "w"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "nw", "schema": schema}}
    for extra in ({"response_format": fmt}, {"guided_json": schema},
                  {"guided_json": json.dumps(schema)}):  # fmt: skip
        r = client.completions.create(model=MODEL, prompt="The answer:", max_tokens=40,
                                      temperature=0, extra_body=extra)  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_json_object(server, client):
    """Any object: nothing bounds its keys, so a sampled tiny model may still be inside
    one at max_tokens; an answer that ends with "stop" is a whole object."""
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, response_format={"type": "json_object"},
            max_tokens=100, temperature=0 if seed == 0 else 1.0, seed=seed,
        )  # fmt: skip
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 1  # greedy writes {} at once


def test_stream_joins_to_the_non_streamed_answer(server, client):
    schema = random_schemas(1, budget=chat_budget(server) - 1, seed=99)[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    kw = dict(model=MODEL, messages=USER, response_format=fmt, temperature=0, max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, **kw) if c.choices]  # fmt: skip
    assert "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), schema)


def test_n_choices_each_follow_the_schema(server, client):
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4}
    r = client.chat.completions.create(
        model=MODEL, messages=USER, n=4, temperature=1.0, seed=5, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )  # fmt: skip
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)


# --- regex, choice, grammar ------------------------------------------------------------


def test_guided_regex_and_choice(server, client):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    colours = ["red", "green", "blue sky"]
    for temperature in (0, 1.0):
        r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20,
                                      temperature=temperature, seed=3,
                                      extra_body={"guided_regex": pattern})  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=20,
                                           temperature=temperature, seed=3,
                                           extra_body={"guided_choice": colours})  # fmt: skip
        assert r.choices[0].message.content in colours


@pytest.mark.parametrize(
    "grammar",
    [
        # Lark (llguidance's syntax)
        'start: "(" item ("," item)* ")"\nitem: /[a-z]{1,3}/ | NUMBER\nNUMBER: /[0-9]{1,2}/',
        # llama.cpp's GBNF, as vLLM's xgrammar backend takes it
        'root ::= "(" item ("," item)* ")"\nitem ::= [a-z] [a-z]? [a-z]? | [0-9] [0-9]?',
    ],
    ids=["lark", "gbnf"],
)
def test_guided_grammar(server, client, grammar):
    shape = re.compile(r"\((?:[a-z]{1,3}|[0-9]{1,2})(?:,(?:[a-z]{1,3}|[0-9]{1,2}))*\)")
    # a list may go on until max_tokens; the sampled ones must close it or be cut short
    for seed in range(3):
        r = client.completions.create(model=MODEL, prompt="List:", max_tokens=60,
                                      temperature=1.0, seed=seed,
                                      extra_body={"guided_grammar": grammar})  # fmt: skip
        text = r.choices[0].text
        if r.choices[0].finish_reason == "stop":
            assert shape.fullmatch(text), text
        else:
            assert shape.fullmatch(text + ")") or shape.fullmatch(text.rstrip(",") + ")"), text


# --- refused -------------------------------------------------------------------------

HOSTILE = [
    # (id, body extra, param, words in the message)
    ("schema bad type", {"guided_json": {"type": "intger"}}, "guided_json", "intger"),
    ("schema remote ref", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"$ref": "http://example.com/s.json"}}}}, "response_format",
     "schema"),
    ("regex unclosed class", {"guided_regex": "[a-"}, "guided_regex", "regex"),
    ("schema bad pattern", {"guided_json": {"type": "string", "pattern": "(a|b"}}, "guided_json",
     "unclosed group"),
    ("schema unsupported keyword", {"guided_json": {"type": "array", "uniqueItems": True}},
     "guided_json", "uniqueItems"),
    ("grammar unknown rule", {"guided_grammar": "start: foo"}, "guided_grammar", "foo"),
    ("grammar garbage", {"guided_grammar": "::= ::= ("}, "guided_grammar", "grammar"),
]  # fmt: skip


@pytest.mark.parametrize("extra,param,words", [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])  # fmt: skip
def test_what_cannot_be_enforced_is_400(server, extra, param, words):
    for path, body in (("/v1/chat/completions", {"messages": USER}),
                       ("/v1/completions", {"prompt": "x"})):  # fmt: skip
        r = httpx.post(f"{server.url}{path}", json={**body, **extra, "max_tokens": 4}, timeout=T)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        assert err["message"].startswith(f"'{param}")
    assert httpx.get(f"{server.url}/health", timeout=T).json() == {"status": "ok"}


def test_a_long_schema_is_refused_before_compiling(server):
    schema = {"type": "object", "properties": {
        f"{a}{b}{c}": {"type": "string"} for a in string.ascii_lowercase
        for b in string.ascii_lowercase for c in "abcdefghij"}}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=T,
                   json={"messages": USER, "guided_json": schema})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
    assert "65536" in r.json()["error"]["message"]


def test_stream_of_a_constrained_request_is_well_formed(server):
    body = {"messages": USER, "stream": True, "max_tokens": 30, "temperature": 0,
            "guided_choice": ["alpha", "beta"]}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=T) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if e["choices"])  # fmt: skip
    assert text in ("alpha", "beta")
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
