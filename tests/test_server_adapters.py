"""`falconet serve --adapter NAME=DIR`: LoRA adapters beside the base in one real server
process, driven by the official `openai` client: each adapter its own model id, requests
for different adapters batched together with the outputs they get alone, unknown ids
404, malformed adapter folders refused at start with one line."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.adapter_tools import FALCON_TARGETS, make_peft_adapter
from tests.conftest import assert_cli_error, build_hf_model, save_hf_model
from tests.server_tools import ServerProcess

T = 120  # client timeout: only there so a broken server cannot hang the suite
PROMPTS = ["In the beginning", "Numbers 1234", "Emoji test", "code: def f(x)"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    hf = build_hf_model("40b")
    base = save_hf_model(hf, tmp_path_factory.mktemp("base"))
    a, b = tmp_path_factory.mktemp("lora_a"), tmp_path_factory.mktemp("lora_b")
    make_peft_adapter(hf, a, FALCON_TARGETS, seed=1)
    make_peft_adapter(hf, b, ["query_key_value", "dense_4h_to_h"], seed=2, r=2, lora_alpha=4)
    return base, a, b


@pytest.fixture(scope="module")
def server(folders):
    base, a, b = folders
    args = ("--model", str(base), "--served-model-name", "base", "--max-batch", "16",
            "--adapter", f"legal={a}", "--adapter", f"medical={b}")  # fmt: skip
    with ServerProcess(*args) as proc:
        yield proc


def complete(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, list[float]]:
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=0
    )
    assert r.model == model
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs


def test_models_lists_the_base_and_each_adapter(server):
    client = server.openai_client(T)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "legal", "medical"}
    assert cards["legal"].parent == "base" and cards["base"].parent is None
    assert client.models.retrieve("medical").id == "medical"


def test_concurrent_requests_equal_their_solo_outputs(server):
    client = server.openai_client(T)
    jobs = [(m, p) for m in ("base", "legal", "medical") for p in PROMPTS]
    alone = [complete(client, m, p) for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, *job), jobs * 2))
    assert together == alone * 2  # texts and logprobs, bit for bit
    by_model = {
        m: [out for (mm, _), out in zip(jobs, alone, strict=True) if mm == m]
        for m in ("base", "legal", "medical")
    }
    assert by_model["legal"] != by_model["base"] and by_model["medical"] != by_model["base"]
    assert by_model["legal"] != by_model["medical"]


def test_chat_names_an_adapter(server):
    client = server.openai_client(T)
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(
        model="legal", messages=messages, max_tokens=4, temperature=0
    )
    assert r.model == "legal"


def test_unknown_adapter_is_404(server):
    client = server.openai_client(T)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="finance", prompt="Hi", max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'finance' does not exist" in err["message"] and "'legal'" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("finance")


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "falconet", "serve", "--port", "0", *args],
        capture_output=True, text=True, timeout=T,
    )  # fmt: skip


def test_malformed_adapters_are_refused_at_start(folders, tmp_path):
    base, a, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{")
    other = tmp_path / "other"  # trained on a wider model: shapes do not fit the base
    make_peft_adapter(build_hf_model("40b", hidden_size=96), other, FALCON_TARGETS, seed=3)
    cases = [
        ((f"x={empty}",), "no adapter_config.json"),
        ((f"x={bad_json}",), "not valid JSON"),
        ((f"x={other}",), "another model size"),
        (("nonsense",), "expected NAME=DIR"),
        ((f"base={a}",), "is taken"),
    ]
    for flags, needle in cases:
        args = ["--model", str(base), "--served-model-name", "base"]
        for flag in flags:
            args += ["--adapter", flag]
        res = serve(*args)
        assert "Traceback" not in res.stderr
        assert_cli_error(res, needle)
