"""`falconet generate --json` and the server's /v1/completions run the same engine and
build their logprobs with the same function, so the same request gives the same choice,
bit for bit: text, tokens, every logprob float, finish reason and usage. Checked for
every architecture in the registry (attention and recurrent) (a new one fails here until it has a tiny model), on
real processes: the CLI as a subprocess, the server through the official `openai` client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

from falconet.models import registry
from tests.conftest import TINY_HF_MODELS, save_hf_model
from tests.server_tools import ServerProcess

# The variants compared, by architecture: every attention layout the registry's models run.
FACE_VARIANTS: dict[str, tuple[str, ...]] = {
    "falcon": (
        "rw",  # falcon-rw-1b: ALiBi, sequential attention/MLP, biases
        "7b",  # falcon-7b: multi-query, rotary, parallel attention/MLP
        "40b",  # falcon-40b/180b: grouped KV heads, new_decoder_architecture (two norms)
        "11b",  # Falcon2-11B: grouped KV heads, one norm, untied head, rope_theta 500042
    ),
    "llama": ("falcon3_shape",),  # Falcon3: GQA 6/2, head_dim 32 != 96/6, rope_theta 1000042
    "falcon_mamba": ("conv4_tied",),  # Falcon-Mamba: recurrent state in SSM slots, no KV
    "falcon_h1": ("gate_then_norm",),  # Falcon-H1: KV blocks and an SSM slot, muP multipliers
}
CASES = [
    pytest.param(arch.name, variant, id=f"{arch.name}-{variant}")
    for arch in registry.ARCHITECTURES
    for variant in FACE_VARIANTS.get(arch.name, (None,))
]

PROMPT = "The quick brown fox"
# (CLI flags, the same request's /v1/completions fields); temperature is always given
# since the two faces default it differently (CLI 0, OpenAI 1).
REQUESTS = {
    "greedy": (
        ["--temperature", "0"],
        {"temperature": 0.0},
    ),
    "sampled": (
        ["--temperature", "0.8", "--seed", "1234"],
        {"temperature": 0.8, "seed": 1234},
    ),
}
MAX_TOKENS, LOGPROBS = 8, 3
T = 120  # client and subprocess timeout: only there so a broken face cannot hang the suite


def cli_completion(folder, flags: list[str]) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "generate", PROMPT, "--model", str(folder), "--json",
         "--logprobs", str(LOGPROBS), "--max-tokens", str(MAX_TOKENS), *flags],
        capture_output=True, text=True, timeout=T, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.splitlines()  # one JSON object, nothing else on stdout
    return json.loads(line)


@pytest.mark.parametrize("arch_name, variant", CASES)
def test_generate_json_equals_the_server_bit_for_bit(arch_name, variant, tmp_path):
    if variant is None:
        pytest.fail(
            f"architecture {arch_name!r} has no tiny model here: add its builder to "
            "tests/conftest.py TINY_HF_MODELS and its variants to FACE_VARIANTS"
        )
    build, _ = TINY_HF_MODELS[arch_name]
    folder = save_hf_model(build(variant), tmp_path / variant)
    assert registry.for_hf(json.loads((folder / "config.json").read_text())).name == arch_name

    server = ServerProcess("--model", str(folder))  # loads while the CLI runs
    try:
        cli = {name: cli_completion(folder, flags) for name, (flags, _) in REQUESTS.items()}
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=T,
                               max_retries=0)  # fmt: skip
        model = client.models.list().data[0].id
        for name, (_, fields) in REQUESTS.items():
            resp = client.completions.create(
                model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, **fields
            )
            [choice] = resp.choices
            ours = cli[name]
            usage = ours.pop("usage")
            # the whole choice: text, finish_reason and the logprobs object, floats with ==
            assert choice.model_dump() == ours, name
            assert resp.usage.model_dump(exclude_none=True) == usage, name

            lp = ours["logprobs"]
            n = usage["completion_tokens"]
            assert n >= 1 and len(lp["tokens"]) == len(lp["token_logprobs"]) == n, name
            rows = zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
            for token, value, top in rows:
                assert top[token] == value and len(top) in (LOGPROBS, LOGPROBS + 1), name
                if name == "greedy":  # the chosen token is the likeliest
                    assert value == max(top.values()), name
    finally:
        server.stop()
