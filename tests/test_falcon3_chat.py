"""Falcon3 chat: a Llama (Falcon3) folder whose tokenizer_config.json carries a chat
template gets that template's prompt, token for token as transformers'
`apply_chat_template` makes it, in `LLM.chat_prompt`, `falconet chat` and the server's
/v1/chat/completions; and the replies are transformers' greedy continuation of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import falconet
from falconet.server.generation import chat_prompt
from falconet.server.protocol import ChatMessage
from tests.conftest import EOS_ID, build_llama_hf_model, write_tokenizer
from tests.server_tools import ServerProcess

# Falcon3-Instruct's turn format (role markers as special tokens, eos after each assistant
# turn), written for this test.
FALCON3_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{%- if m['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
MESSAGES = [
    {"role": "system", "content": "You are Falcon, a helpful assistant."},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "Jumps over the lazy dog."},
    {"role": "user", "content": "Numbers 1234 and 東京?"},
]
SYSTEM, QUESTION = "You are Falcon.", "Falcon models run on your own machine?"
MAX_TOKENS = 8
CARD = "---\nlicense: other\nlicense_name: falcon-llm-license\n---\n"


@pytest.fixture(scope="module")
def falcon3(tmp_path_factory) -> Path:
    """A tiny Falcon3-shaped llama folder with role tokens and a chat template."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("falcon3")
    write_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(ROLE_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False, "chat_template": FALCON3_TEMPLATE,
    }))  # fmt: skip
    (folder / "README.md").write_text(CARD)
    build_llama_hf_model("falcon3_shape", vocab_size=tok.get_vocab_size()).save_pretrained(folder)
    return folder


def hf_prompt_ids(folder: Path, messages: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    return hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def hf_greedy_reply(folder: Path, messages: list[dict]) -> str:
    """transformers' greedy reply to the chat, decoded by falconet's tokenizer (its
    decoding is tested against transformers' in test_tokenizer)."""
    from transformers import LlamaForCausalLM

    ids = hf_prompt_ids(folder, messages)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    if EOS_ID in out:
        out = out[: out.index(EOS_ID)]
    assert out, "the reply is empty: the comparison would prove nothing"
    return falconet.load(folder).tokenizer.decode(out)


def test_prompt_is_the_template_as_transformers_renders_it(falcon3):
    from transformers import AutoTokenizer

    llm = falconet.load(falcon3)
    hf = AutoTokenizer.from_pretrained(falcon3)
    for gen in (True, False):
        ours = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
    assert ours.startswith("<|system|>\nYou are Falcon, a helpful assistant.\n<|user|>\n")
    ids = hf_prompt_ids(falcon3, MESSAGES)
    assert [ids[0], ids[-2]] == [
        llm.tokenizer.token_to_id(t) for t in ("<|system|>", "<|assistant|>")
    ]
    assert llm.chat_prompt(MESSAGES) == ids  # the API and `falconet chat`
    server_messages = [ChatMessage.model_validate(m) for m in MESSAGES]
    assert chat_prompt(llm.tokenizer, server_messages) == ids  # /v1/chat/completions


def test_cli_chat_replies_to_the_templated_prompt(falcon3):
    expected = hf_greedy_reply(falcon3, [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": QUESTION}])  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "chat", "--model", str(falcon3), "--system", SYSTEM,
         "--max-tokens", str(MAX_TOKENS)],
        input=QUESTION + "\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    reply = res.stdout.split("falcon> ", 1)[1].split("\nyou> ", 1)[0]
    assert reply == expected
    assert (
        f"falconet: {falcon3}: family Falcon3 (Llama architecture); licence falcon-llm-license"
        in (res.stderr)
    )


def test_server_chat_completion_replies_to_the_templated_prompt(falcon3):
    expected = hf_greedy_reply(falcon3, MESSAGES)
    server = ServerProcess("--model", str(falcon3)).wait_ready()
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": falcon3.name, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
            "temperature": 0,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        assert r.json()["usage"]["prompt_tokens"] == len(hf_prompt_ids(falcon3, MESSAGES))
    finally:
        server.stop()
    assert (
        f"falconet: model {falcon3}: family Falcon3 (Llama architecture); "
        "licence falcon-llm-license (Falcon-LLM License) [README.md front matter]"
    ) in server.lines
