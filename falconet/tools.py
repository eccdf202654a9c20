"""Tool calling: the grammar that makes a model call a function, and its calls read back.

The format is the one Falcon3-Instruct's chat template teaches (and the fallback chat
format, tokenizer.py, copies for models without a template)::

    <tool_call>
    [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]
    </tool_call>

A single object in the tags (Hermes/Qwen style) and several tagged blocks are read too.
With tool_choice "required" or a named function the output is constrained to exactly
that shape, each call's arguments to its function's JSON schema (constraints.py), so
the call always parses; with "auto" the model may answer in text, and text that does
not parse as calls stays text. Parsing is `json.loads` on what the tags hold.

`ToolCallStream` does the same for a stream: it passes text through until a tag may be
starting, holds everything from the tag on, and reads the calls at the end, so the
streamed content and calls are those of the whole text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from falconet.constraints import JSON_LAYOUT, Grammar
from falconet.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer

__all__ = ["Function", "ToolCall", "ToolCallStream", "parse_tool_calls", "tool_call_grammar"]

ANY_ARGUMENTS = {"type": "object"}  # a function that declares no parameters


@dataclass(frozen=True)
class Function:
    """A function a request offers the model (OpenAI's tools[].function)."""

    name: str
    parameters: dict[str, Any] | None = None  # a JSON schema; None = any object


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


def calls_schema(functions: list[Function], parallel: bool) -> dict[str, Any]:
    """The JSON schema of the list in the tags: 1 call (or more when `parallel`), each
    naming one of `functions` with arguments following its parameters."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or ANY_ARGUMENTS,
            },  # fmt: skip
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}  # fmt: skip
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_call_grammar(
    functions: list[Function], parallel: bool, tokenizer: Tokenizer, name: str = "'tools'"
) -> Grammar:
    """The grammar of an answer that is nothing but calls to `functions`."""
    schema = {**calls_schema(functions, parallel), "x-guidance": JSON_LAYOUT}
    lark = (f"start: {json.dumps(TOOL_CALL_OPEN + chr(10))} calls "
            f"{json.dumps(chr(10) + TOOL_CALL_CLOSE)}\ncalls: %json {json.dumps(schema)}")  # fmt: skip
    return Grammar.compile("lark", lark, tokenizer, name)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _calls(block: str) -> list[ToolCall] | None:
    """The calls one tagged block holds, or None when it is not calls."""
    try:
        value = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer. With calls, the content is the text before
    the first tag with its trailing whitespace removed (None if nothing is left), and
    the text after the last block is added on a new line; without, it is `text`."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    at = start
    while True:
        body_at = at + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_at)
        block = text[body_at:] if end < 0 else text[body_at:end]  # an unclosed last block
        found = _calls(block)
        if found is None:
            return text, []
        calls += found
        if end < 0:
            tail = ""
            break
        at = end + len(TOOL_CALL_CLOSE)
        following = text[at:].lstrip()
        if not following.startswith(TOOL_CALL_OPEN):
            tail = following.strip()
            break
        at = len(text) - len(following)
    content = "\n".join(part for part in (text[:start].rstrip(), tail) if part)
    return content or None, calls


class ToolCallStream:
    """Streamed text -> content pieces to send now; the calls at the end.

    Text that may be the start of a tag, or whitespace that may come before one, is
    held back; from a tag on, everything is held until `finish`, which returns what is
    left of the content (as `parse_tool_calls` would give it) and the calls."""

    def __init__(self) -> None:
        self._text = ""  # everything so far
        self._sent = 0  # characters of _text sent as content
        self._in_call = False

    def add(self, piece: str) -> str:
        self._text += piece
        if self._in_call:
            return ""
        tag = self._text.find(TOOL_CALL_OPEN, self._sent)
        if tag >= 0:
            self._in_call = True
            hold = tag
        else:
            hold = len(self._text) - _partial_tag(self._text)
        # whitespace before a tag is not content: hold it until text follows it
        hold = self._sent + len(self._text[self._sent : hold].rstrip())
        out = self._text[self._sent : hold]
        self._sent = hold
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not yet sent, and the calls (empty when the text holds none)."""
        content, calls = parse_tool_calls(self._text)
        if not calls:
            return self._text[self._sent :], []
        sent = self._text[: self._sent]
        rest = (content or "")[len(sent) :]  # content begins with what was sent
        return rest, calls


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins the open tag."""
    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
