"""Tool calling through a real `falconet serve` and the official openai client, on a tiny
random Falcon whose chat template takes tools the way Falcon3-Instruct's does (a
template written here in that format: tools as JSON in the system turn, calls as a JSON
list in <tool_call> tags, results in <tool_response> tags).

A random model never means to call a tool, which makes it a hard client: with
tool_choice "required" or a named function every answer must still parse into calls
whose arguments validate against the function's schema (python-jsonschema), and the
streamed tool-call deltas must join to the non-streamed calls.
"""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from falconet.tokenizer import Tokenizer
from falconet.tools import ToolCallStream, parse_tool_calls
from tests.conftest import build_hf_model, save_hf_model
from tests.server_tools import ServerProcess

T = 300  # client timeout: only there so a broken server cannot hang the suite
MODEL = "tiny-tools"

# Falcon3-Instruct's tool format, in a template of our own.
TEMPLATE = """{%- if tools %}<|system|>
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{% endif %}You may call these functions: <tools>{{ tools|tojson }}</tools>
Calls go in <tool_call></tool_call> tags as a JSON list.
{% endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}{% if not tools %}<|system|>
{{ message['content'] }}
{% endif %}
{%- elif message['role'] == 'user' %}<|user|>
{{ message['content'] }}
{% elif message['role'] == 'assistant' %}<|assistant|>
{{ message['content'] }}
{%- if message.tool_calls %}<tool_call>
{{ message.tool_calls|tojson }}
</tool_call>{% endif %}{{ eos_token }}
{% elif message['role'] == 'tool' %}<|assistant|>
<tool_response>
{{ message['content'] }}
</tool_response>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99},
        "note": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the forecast",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "What is the weather in Paris?"}]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = save_hf_model(build_hf_model("7b", seed=3), tmp_path_factory.mktemp("tools"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(folder):
    with ServerProcess("--model", str(folder), "--served-model-name", MODEL, "--max-batch", "8",
                       env={"OMP_NUM_THREADS": "1"}) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.openai_client(T)


def assert_valid_calls(message, names: set[str], most: int | None = None) -> None:
    assert message.tool_calls, message
    assert most is None or len(message.tool_calls) <= most
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# --- rendering ---------------------------------------------------------------------------


def test_tools_and_tool_messages_reach_the_template(folder):
    tok = Tokenizer.from_dir(folder)
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]  # fmt: skip
    chat = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "3", "tool_call_id": "call_1"}]  # fmt: skip
    text = tok.apply_chat_template(chat, tools=TOOLS)
    assert f"<tools>{json.dumps(TOOLS)}</tools>" in text
    assert f"<tool_call>\n{json.dumps(calls)}\n</tool_call>" in text
    assert "<tool_response>\n3\n</tool_response>" in text and text.endswith("<|assistant|>\n")


def test_the_fallback_format_offers_tools_too():
    tok = Tokenizer.from_dir("falconet/models/falconet-tiny")  # no chat template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c"}],
        tools=TOOLS,
    )  # fmt: skip
    assert json.dumps(TOOLS) in text and "<tool_call>" in text
    assert text.endswith("User: hi\nTool: 42\nFalcon:")


# --- required and named: always calls that validate --------------------------------------


def test_required_always_parses_into_the_schema(client):
    def ask(seed: int):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=400,
            temperature=1.0, seed=seed, parallel_tool_calls=seed % 2 == 0,
        )  # fmt: skip

    for seed in range(8):
        r = ask(seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert_valid_calls(choice.message, set(SCHEMAS), most=None if seed % 2 == 0 else 1)


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, n=3, temperature=1.0, seed=11, max_tokens=400,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message, {"add"})


def test_streamed_tool_call_deltas_join_to_the_non_streamed_call(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
              max_tokens=400)  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    joined: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = joined.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(joined.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in joined.values())


# --- auto and none -------------------------------------------------------------------------


def test_auto_and_none(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           max_tokens=40, temperature=1.0, seed=seed)  # fmt: skip
        choice = r.choices[0]
        if choice.message.tool_calls:  # a random model rarely calls on its own
            assert choice.finish_reason == "tool_calls"
            assert_valid_calls(choice.message, set(SCHEMAS))
        else:
            assert isinstance(choice.message.content, str)
    with_tools = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                max_tokens=1, temperature=0)  # fmt: skip
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8,
                                          tool_choice="none", temperature=0)  # fmt: skip
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    # "none": the tools are not offered, so the answer is the one without tools
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


def test_a_conversation_with_tool_results(client):
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]  # fmt: skip
    chat = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "3", "tool_call_id": "call_1"}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=chat, tools=TOOLS,
                                       tool_choice="required", max_tokens=400, seed=1)  # fmt: skip
    assert_valid_calls(r.choices[0].message, set(SCHEMAS))


# --- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "strng"}}}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}},
         "tool_choice"),
        ({"tools": TOOLS, "guided_regex": "a+"}, "tools"),
    ],
    ids=["unenforceable parameters", "unknown function", "tools and a constraint"],
)  # fmt: skip
def test_tool_requests_that_cannot_run_are_400(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, **extra},
                   timeout=T)  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# --- parsing, whole and streamed -----------------------------------------------------------

ANSWERS = [
    "Sunny.",
    '<tool_call>\n[{"name": "add", "arguments": {"a": 1, "b": 2}}]\n</tool_call>',
    'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    '<tool_call>[{"name": "a", "arguments": {}}]</tool_call>\n<tool_call>{"name": "b", '
    '"arguments": "{\\"x\\": 1}"}</tool_call> done',
    "<tool_call>\n[not json]\n</tool_call>",
    "x < y and <tool_ is not a tag",
    '  \n<tool_call>[{"name": "a", "arguments": {}}]',  # cut before the closing tag
    "<tool_call>[]</tool_call>",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_parsing_equals_whole_parsing(text):
    content, calls = parse_tool_calls(text)
    rng = random.Random(len(text))
    for _ in range(20):  # random cuts into pieces
        stream, sent, at = ToolCallStream(), "", 0
        while at < len(text):
            step = rng.randint(1, 6)
            sent += stream.add(text[at : at + step])
            at += step
        rest, streamed = stream.finish()
        assert (sent + rest or None) == (content if calls else text or None)
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]


def test_what_the_parser_reads():
    assert parse_tool_calls("Sunny.") == ("Sunny.", [])
    content, calls = parse_tool_calls(ANSWERS[3])
    assert content == "done" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {}), ("b", {"x": 1})]  # fmt: skip
    assert parse_tool_calls(ANSWERS[4]) == (ANSWERS[4], [])  # not calls: left as text
    assert parse_tool_calls(ANSWERS[2])[0] == "Let me check."
    assert parse_tool_calls(ANSWERS[7]) == (ANSWERS[7], [])
