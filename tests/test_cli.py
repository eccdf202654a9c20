"""The `falconet` command, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import falconet
from falconet.request_rules import RULES, must_be
from tests.conftest import assert_cli_error

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "falconet", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def test_generate_prints_what_the_api_returns(tiny_7b):
    expected = falconet.load(tiny_7b).generate("The quick", max_tokens=12, ignore_eos=True)
    res = run(
        "generate", "The quick", "--model", str(tiny_7b), "--max-tokens", "12", "--ignore-eos"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    streamed = run(
        "generate",
        "The quick",
        "--model",
        str(tiny_7b),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--stream",
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected + "\n"


def test_generate_sampling_flags_and_seed(tiny_7b):
    args = ("generate", "Hi", "--model", str(tiny_7b), "--max-tokens", "10", "--ignore-eos", "-t", "1.2",
            "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7")  # fmt: skip
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    expected = falconet.load(tiny_7b).generate(
        "Hi", max_tokens=10, ignore_eos=True, temperature=1.2, top_k=50, top_p=0.9, min_p=0.01,
        repetition_penalty=1.1, seed=7,
    )  # fmt: skip
    assert a.stdout == expected + "\n"


def test_generate_json_is_the_api_completion():
    # The embedded default model: trained, so its tokens are whole words, each its own text.
    llm = falconet.load()
    args = ("generate", "In the beginning", "--max-tokens", "6", "--ignore-eos", "--json")
    [c] = llm.complete(["In the beginning"], max_tokens=6, ignore_eos=True, logprobs=0)
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": 6,
             "total_tokens": c.prompt_tokens + 6}  # fmt: skip
    plain = run(*args)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == {
        "index": 0, "text": c.text, "logprobs": None, "finish_reason": "length", "usage": usage
    }  # fmt: skip
    res = run(*args, "--logprobs", "0")
    assert res.returncode == 0, res.stderr
    lp = json.loads(res.stdout)["logprobs"]
    tokens = [llm.tokenizer.decode([t.token]) for t in c.logprobs]
    assert lp["tokens"] == tokens and "".join(tokens) == c.text
    assert lp["token_logprobs"] == [t.logprob for t in c.logprobs]  # exact: floats round-trip
    assert lp["top_logprobs"] == [
        {tok: t.logprob} for tok, t in zip(tokens, c.logprobs, strict=True)
    ]
    assert lp["text_offset"] == [len("".join(tokens[:i])) for i in range(6)]


def test_info_reports_variant_and_sizes(hf_checkpoints):
    folder = hf_checkpoints["40b"][1]
    res = run("info", "--model", str(folder))
    assert res.returncode == 0, res.stderr
    llm = falconet.load(folder)
    assert "grouped, 2 kv heads" in res.stdout
    assert f"{llm.model.num_parameters():,}" in res.stdout
    # 2 layers * 2 (K,V) * 2 kv heads * 8 head_dim * 4 bytes
    assert (
        f"KV cache per token                  {2 * 2 * 2 * 8 * 4:,} bytes (4x smaller" in res.stdout
    )


def test_chat_keeps_history_and_resets(tiny_7b):
    res = run(
        "chat",
        "--model",
        str(tiny_7b),
        "--max-tokens",
        "4",
        stdin="hello\n/reset\nhi again\n/exit\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("falcon> ") == 2
    assert "(history cleared)" in res.stdout


def logprobs_refused(value: int) -> str:  # the server's words for the same value
    return f"'logprobs' {must_be(RULES['logprobs'].allowed, value)}"


def _not_falcon(tmp_path):
    d = tmp_path / "mistral"  # llama is a model type falconet runs (Falcon3)
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 64}))
    return d


@pytest.mark.parametrize(
    "args, needle",
    [
        (("generate", "x", "--model", "/no/such/folder"), "no such file or folder"),
        (("generate", "x", "--model", "NOT_FALCON"), "model_type 'mistral' is not a Falcon model"),
        (("generate", "x", "--model", "TINY", "--temperature", "-1"), "temperature"),
        (("generate", "x", "--model", "TINY", "--top-p", "2"), "top_p"),
        (("generate", "x", "--model", "TINY", "--max-tokens", "0"), "max_tokens"),
        (("generate", "x", "--model", "TINY", "--top-k", "abc"), "--top-k"),
        (("generate", "x", "--model", "TINY", "--dtype", "int3"), "--dtype"),
        (("frobnicate",), "invalid choice"),
        (("generate", "x", "--model", "TINY", "--device", "cuda"), "no CUDA GPU"),
        (("generate", "x", "--model", "TINY", "--device", "banana"), "not a torch device"),
        (("generate", "x", "--model", ""), "model path is empty"),
        (("chat", "--model", "TINY", "--max-tokens", "5000"), "leaves no room"),
        (("generate", "x", "--model", "TINY", "--quant", "q9_9"), "unknown quantization type"),
        (("generate", "x", "--model", "TINY", "--quant", "q4_k"), "unknown quantization type"),
        (("info", "--model", "TINY", "--quant", ""), "unknown quantization type"),
        ((), "required"),
        (("generate", "x", "--model", "TINY", "--json", "--logprobs", "-1"), logprobs_refused(-1)),
        (("generate", "x", "--model", "TINY", "--json", "--logprobs", "21"), logprobs_refused(21)),
        (
            ("generate", "x", "--model", "TINY", "--json", "--logprobs", "abc"),
            "argument --logprobs: invalid int value: 'abc'",
        ),
        (("generate", "x", "--model", "TINY", "--logprobs", "2"), "--logprobs needs --json"),
        (("generate", "x", "--model", "TINY", "--json", "--stream"), "drop --stream"),
    ],
)
def test_errors_print_one_line_and_exit_2(tmp_path, tiny_7b, args, needle):
    swap = {"NOT_FALCON": str(_not_falcon(tmp_path)), "TINY": str(tiny_7b)}
    res = run(*(swap.get(a, a) for a in args))
    assert_cli_error(res, needle)


def test_quant_flag_quantizes_while_loading(tiny_7b):
    res = run("info", "--model", str(tiny_7b), "--quant", "q4_0")
    assert res.returncode == 0, res.stderr
    assert "q4_0 x 8" in res.stdout and "q8_0 x 2" in res.stdout  # 2 layers x 4; head + embedding
    gen = run("generate", "The", "--model", str(tiny_7b), "--quant", "Q8_0", "--max-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.strip()


def test_a_file_that_is_not_a_model_folder(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    res = run("info", "--model", str(f))
    assert res.returncode == 2
    assert "expected a Hugging Face model folder" in res.stderr


def test_chat_history_is_kept_trimmed_and_reset(tiny_7b):
    from falconet.cli.generate import fit_history
    from falconet.errors import GenerationError

    llm = falconet.load(tiny_7b)
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    ids = fit_history(llm, "be brief", history, budget=10_000)
    text = llm.tokenizer.decode(ids)
    assert (
        text
        == "be brief\nUser: first question\nFalcon: first answer\nUser: second question\nFalcon:"
    )
    # a budget that fits only the newest turn drops the oldest pair, keeps the system prompt
    short = len(llm.chat_prompt([{"role": "system", "content": "be brief"}, history[-1]]))
    ids = fit_history(llm, "be brief", history, budget=short)
    assert llm.tokenizer.decode(ids) == "be brief\nUser: second question\nFalcon:"
    assert history == [{"role": "user", "content": "second question"}]
    with pytest.raises(GenerationError, match="shorter message"):
        fit_history(llm, None, [{"role": "user", "content": "word " * 500}], budget=20)


def test_generate_with_no_model_uses_the_embedded_default_model():
    res = run("generate", "The", "--max-tokens", "16")
    assert res.returncode == 0, res.stderr
    expected = falconet.load().generate("The", max_tokens=16)
    assert res.stdout == expected + "\n"
    assert len(expected.split()) >= 3  # a real continuation, in words


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    from falconet import llm

    monkeypatch.setattr(llm, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(falconet.FalconetError, match="embedded model absent is missing"):
        falconet.load()
