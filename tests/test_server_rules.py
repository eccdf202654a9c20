"""The server's request rules, schema and metrics, through one real `falconet serve
--rag-store` process: every surface takes its sampling limits from `request_rules.RULES`
(SamplingParams, the CLI, /v1/completions, /v1/chat/completions and /v1/rag/query refuse
the same value with the same words); /openapi.json describes the request bodies; /metrics
parses with prometheus_client's own parser."""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from falconet.cli import main as cli_main
from falconet.errors import GenerationError
from falconet.rag.retrieve import DEFAULT_MODE, MODES
from falconet.request_rules import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    RULES,
    SEED_MAX,
    SEED_MIN,
    STOP_ALLOWED,
    STOP_TOKEN_IDS_ALLOWED,
)
from falconet.sampling import SamplingParams
from falconet.server.metrics import ITL_BUCKETS, TTFT_BUCKETS, Metrics
from tests.server_tools import ServerProcess

T = 120
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("rules") / "store"
    with ServerProcess("--rag-store", str(store), env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


def post(server: ServerProcess, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=T, **kw)


def _beyond_the_rules() -> list[tuple[str, object]]:
    """A value just outside each bound of each rule, and the stop rules' edges."""
    cases: list[tuple[str, object]] = []
    for name, rule in RULES.items():
        if name == "logprobs":  # /v1/completions only (chat calls it top_logprobs)
            continue
        step = 1 if rule.kind is int else 0.5
        if rule.ge is not None:
            # on the wire, top_k = -1 is vLLM's "off" (0 here), so -2 is the first refused
            cases.append((name, rule.kind(rule.ge - step * (2 if name == "top_k" else 1))))
        if rule.gt is not None:
            cases.append((name, rule.kind(rule.gt)))
        if rule.le is not None:
            above = rule.kind(rule.le + step)
            # 1e37 + 0.5 == 1e37 in float64: take the next float instead
            cases.append((name, above if above > rule.le else math.nextafter(rule.le, math.inf)))
    cases += [
        ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
        ("stop", ["x" * (MAX_STOP_LENGTH + 1)]),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
    ]
    return cases


BEYOND = _beyond_the_rules()


def _cli_flags(field: str, value) -> list[str]:
    if field == "stop":
        return [arg for s in value for arg in ("--stop", s)]
    if field == "stop_token_ids":
        return [arg for i in value for arg in ("--stop-token-id", str(i))]
    return ["--" + field.replace("_", "-"), str(value)]


@pytest.mark.parametrize("field,value", BEYOND, ids=[f"{f}={v!r}"[:40] for f, v in BEYOND])
def test_one_rule_table_for_every_surface(server, capsys, field, value):
    with pytest.raises(GenerationError) as e:
        SamplingParams(**{field: value})
    message = str(e.value)
    allowed = (
        RULES[field].allowed
        if field in RULES
        else {"stop": STOP_ALLOWED}.get(field, STOP_TOKEN_IDS_ALLOWED)
    )
    assert message.startswith(f"'{field}' must be {allowed}; got ")

    assert cli_main(["generate", "x", *_cli_flags(field, value)]) == 2  # before any load
    assert capsys.readouterr().err == f"falconet: error: {message}\n"

    for path, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/rag/query", {"query": "x"}),
    ]:
        r = post(server, path, {**body, field: value})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"] == {
            "message": message,
            "type": "invalid_request_error",
            "param": field,
            "code": None,
        }


def test_the_bounds_themselves_are_accepted_everywhere(server):
    """A temperature the old RAG route capped at 2, seeds at both ends of torch's range."""
    edges = {"temperature": 2.5, "top_p": 1, "presence_penalty": -2, "top_k": 0}
    for seed in (SEED_MIN, SEED_MAX):
        assert SamplingParams(seed=seed, **edges).seed == seed
        wire = {**edges, "top_k": -1}  # on the wire, vLLM's -1 is "off" too
        for path, body in [
            ("/v1/completions", {"prompt": "And", "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
            ("/v1/rag/query", {"query": "light", "mode": "bm25", "answer": False}),
        ]:
            r = post(server, path, {**body, **wire, "seed": seed})
            assert r.status_code == 200, (path, r.text)


def test_null_is_the_default_for_every_sampling_field(server):
    """`null` means "the default" for each field every generating route shares (top_k,
    whose validator wraps another, once answered null with a 500)."""
    from falconet.server.protocol import SamplingFields

    for field in SamplingFields.model_fields:
        for path, body in [
            ("/v1/completions", {"prompt": "And", "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
            ("/v1/rag/query", {"query": "light", "mode": "bm25", "answer": False}),
        ]:
            r = post(server, path, {**body, field: None})
            assert r.status_code == 200, (field, path, r.text)


def test_null_is_the_default_for_every_request_field(server):
    """Every optional field of both OpenAI routes, `null`: its default (max_tokens, whose
    validator wraps another, once answered null with a 500 found by the fuzz run)."""
    from falconet.server.protocol import ChatCompletionRequest, CompletionRequest

    for model, path, body, required in [
        (CompletionRequest, "/v1/completions", {"prompt": "And"}, "prompt"),
        (ChatCompletionRequest, "/v1/chat/completions", {"messages": USER}, "messages"),
    ]:
        for field in model.model_fields:
            if field == required:
                continue
            extra = {} if field in ("max_tokens", "max_completion_tokens") else {"max_tokens": 2}
            r = post(server, path, {**body, **extra, field: None})
            assert r.status_code == 200, (field, path, r.text)


def test_seeds_span_torch_s_64_bit_range(server):
    """Choice j of a seeded request samples with seed + j, wrapped as torch.Generator
    wraps it: choice 1 of seed 2**64 - 1 is seed 0, and 2**64 - 1 is also seed -1."""

    def texts(seed: int, n: int) -> list[str]:
        body = {
            "prompt": "And it came to pass",
            "max_tokens": 12,
            "temperature": 1.0,
            "ignore_eos": True,
            "n": n,
            "seed": seed,
        }
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    top = texts(SEED_MAX, 2)
    assert texts(0, 1) == [top[1]]
    assert texts(-1, 1) == [top[0]]
    assert top[0] != top[1]


def test_json_bodies_are_read_whatever_their_content_type(server):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; no header at all is
    # what httpx sends for raw bytes
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(
            f"{server.url}/v1/completions",
            content=b'{"prompt": "And", "max_tokens": 2}',
            headers=headers,
            timeout=T,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_openapi_describes_the_request_bodies(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=T).json()
    schemas = spec["components"]["schemas"]

    def body_of(path: str) -> dict:
        operation = spec["paths"][path]["post"]
        assert "422" not in operation["responses"]  # invalid bodies get OpenAI's 400
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.split("/")[-1]]

    def types(prop: dict) -> set[str]:
        return {p.get("type", p.get("$ref")) for p in prop.get("anyOf", [prop])}

    completion, chat, rag = (
        body_of(p) for p in ("/v1/completions", "/v1/chat/completions", "/v1/rag/query")
    )
    assert completion["required"] == ["prompt"] and chat["required"] == ["messages"]
    for body in (completion, chat, rag):
        props = body["properties"]
        ruled = [(name, name) for name in RULES if name != "logprobs"]
        ruled += [("logprobs", "logprobs")] if body is completion else []
        ruled += [("top_logprobs", "logprobs")] if body is chat else []
        for field, name in ruled:
            rule = RULES[name]
            [number] = [p for p in props[field]["anyOf"] if p["type"] != "null"]
            assert number["type"] == ("integer" if rule.kind is int else "number"), field
            # FastAPI's OpenAPI model holds bounds as floats (the seed's 2**64 - 1 too)
            for key, bound in (
                ("minimum", rule.ge),
                ("maximum", rule.le),
                ("exclusiveMinimum", rule.gt),
            ):
                assert number.get(key) == (None if bound is None else float(bound)), field
        assert types(props["stop"]) == {"string", "array", "null"}
        assert types(props["ignore_eos"]) == {"boolean", "null"}
    c, ch = completion["properties"], chat["properties"]
    assert types(c["prompt"]) == {"string", "array"}
    assert c["max_tokens"]["default"] == 16 and c["temperature"]["default"] == 1.0
    assert types(c["n"]) == {"integer", "null"} and types(c["stream"]) == {"boolean", "null"}
    assert types(c["logprobs"]) == {"integer", "null"}
    assert ch["messages"]["type"] == "array"
    message = schemas[ch["messages"]["items"]["$ref"].split("/")[-1]]
    assert set(message["properties"]["role"]["enum"]) == {
        "system",
        "developer",
        "user",
        "assistant",
        "tool",  # tool calling (issue 14)
    }
    assert types(ch["logprobs"]) == {"boolean", "null"}
    assert "echo" in c and "functions" in ch  # declared, to be refused unless "off"
    # structured output and tools (issue 14) are described, not just accepted
    assert types(ch["tools"]) == {"array", "null"} and "tool_choice" in ch
    assert types(c["guided_regex"]) == {"string", "null"}
    assert {"response_format", "guided_json", "guided_choice", "guided_grammar"} <= set(c)
    r = rag["properties"]
    assert r["mode"]["anyOf"][0]["enum"] == list(MODES) and r["mode"]["default"] == DEFAULT_MODE
    assert r["temperature"]["default"] == 0.0 and rag["required"] == ["query"]


def test_metrics_parse_with_prometheus_client(server):
    def families() -> dict:
        text = httpx.get(f"{server.url}/metrics", timeout=T).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def completions_ok(fams: dict) -> float:
        return sum(
            s.value
            for s in fams["falconet_http_requests"].samples
            if s.name.endswith("_total")
            and s.labels == {"endpoint": "/v1/completions", "status": "200"}
        )

    before = families()
    r = post(
        server,
        "/v1/completions",
        {"prompt": "And", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200
    after = families()
    assert completions_ok(after) == completions_ok(before) + 1
    kinds = {name: f.type for name, f in after.items()}
    assert kinds == {
        "falconet_http_requests": "counter",
        "falconet_prompt_tokens": "counter",
        "falconet_generation_tokens": "counter",
        "falconet_client_disconnects": "counter",
        "falconet_sequences_running": "gauge",
        "falconet_sequences_waiting": "gauge",
        "falconet_max_batch": "gauge",
        "falconet_max_queue": "gauge",
        "falconet_prefix_cache_hit_rate": "gauge",
        "falconet_prefix_cache_hit_tokens": "gauge",
        "falconet_prefix_cache_query_tokens": "gauge",
        "falconet_prefix_cache_blocks": "gauge",
        "falconet_time_to_first_token_seconds": "histogram",
        "falconet_inter_token_latency_seconds": "histogram",
    } | {name: "gauge" for name in kinds if name.endswith("_created")}

    def value(name: str, sample: str | None = None) -> float:
        [s] = [s for s in after[name].samples if s.name == (sample or name)]
        return s.value

    generated = value("falconet_generation_tokens", "falconet_generation_tokens_total")
    before_generated = [
        s.value for s in before["falconet_generation_tokens"].samples if s.name.endswith("_total")
    ][0]
    assert generated == before_generated + 3
    assert value("falconet_max_batch") == 8 and value("falconet_sequences_running") == 0
    for name, buckets in (
        ("falconet_time_to_first_token_seconds", TTFT_BUCKETS),
        ("falconet_inter_token_latency_seconds", ITL_BUCKETS),
    ):
        le = [s.labels["le"] for s in after[name].samples if s.name == name + "_bucket"]
        assert [float(x) for x in le] == [*buckets, math.inf]
        counts = [s.value for s in after[name].samples if s.name == name + "_bucket"]
        assert counts == sorted(counts) and counts[-1] == value(name, name + "_count") > 0


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()  # a shared (global) registry would refuse the second
    a.count_request("/v1/completions", 200)
    a.add_generated(4, 0.2)
    labels = {"endpoint": "/v1/completions", "status": "200"}
    assert a.registry.get_sample_value("falconet_http_requests_total", labels) == 1
    assert b.registry.get_sample_value("falconet_http_requests_total", labels) is None
    assert a.registry.get_sample_value("falconet_generation_tokens_total") == 4
    assert b.registry.get_sample_value("falconet_generation_tokens_total") == 0
    # the 0.2 s gap is spread over the 4 tokens: 4 observations of 0.05 s
    assert a.registry.get_sample_value("falconet_inter_token_latency_seconds_count") == 4
    assert (
        a.registry.get_sample_value("falconet_inter_token_latency_seconds_bucket", {"le": "0.05"})
        == 4
    )
