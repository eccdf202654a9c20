"""Schema-driven fuzzing of a real `falconet serve --rag-store --rag-root` process:
schemathesis reads the served /openapi.json and sends every operation bodies, path
parameters and content that the schema allows (positive) and that it breaks (negative).
Whatever arrives, the answer is never a 5xx, the server counts no 5xx in /metrics, and it
goes on serving.

Bounded and deterministic: a fixed number of examples per operation and mode from a
derandomized Hypothesis (no example database, no shrinking), and generation kept light by
the server itself (a 16-token context, so no request generates more than a few tokens)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from tests.server_tools import ServerProcess

T = 60
EXAMPLES = 10  # per operation and mode: ~170 requests, ~25 s on two cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    root.mkdir()
    (root / "light.txt").write_text("And God said, Let there be light: and there was light.\n")
    with ServerProcess(
        "--max-context", "16", "--max-batch", "4", "--max-queue", "4",
        "--rag-store", str(base / "store"), "--rag-root", str(root),
        env={"OMP_NUM_THREADS": "1"},
    ) as proc:  # fmt: skip
        yield proc


def server_errors(url: str) -> float:
    """5xx answers the server has counted, whoever saw them."""
    text = httpx.get(f"{url}/metrics", timeout=T).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "falconet_http_requests"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["status"].startswith("5")
    )


def fuzz(operation, mode: GenerationMode, url: str) -> tuple[int, list[str]]:
    """EXAMPLES cases of `operation` in `mode`, sent: (how many, the 5xx answers)."""
    sent, failures = [0], []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        sent[0] += 1
        response = case.call(base_url=url, timeout=T)
        if response.status_code >= 500:  # collected, not raised: every one is reported
            failures.append(
                f"{case.method} {case.formatted_path} ({mode.value}) -> "
                f"{response.status_code} {response.text[:200]}; body {case.body!r:.300}"
            )

    try:
        send()
    except Unsatisfiable:  # no parameters to break (GET /health): nothing negative to send
        assert mode is GenerationMode.NEGATIVE
    return sent[0], failures


def test_fuzzed_requests_never_get_a_5xx(server):
    url = server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent, failures, paths = 0, [], set()
    for result in schema.get_all_operations():
        operation = result.ok()
        paths.add(operation.path)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n, failed = fuzz(operation, mode, url)
            sent, failures = sent + n, failures + failed

    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
            "/v1/rag/documents", "/v1/rag/query"} <= paths  # fmt: skip
    assert sent > 150
    assert failures == []
    assert server_errors(url) == 0
    assert httpx.get(f"{url}/health", timeout=T).json() == {"status": "ok"}
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "And", "max_tokens": 2}, timeout=T)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
