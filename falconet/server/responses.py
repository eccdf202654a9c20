"""OpenAI response bodies: completion and chat choices, stream chunks. The logprobs
object and usage counts are built in falconet/generate.py, shared with the CLI."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from falconet.generate import TokenStrings, completion_logprobs
from falconet.sampling import TokenLogprobs
from falconet.tools import ToolCall

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        + b"\n\n"
    )


class Formatter:
    """Builds the bodies of one request. `completion` (legacy /v1/completions) and chat
    differ in the choice shape and the logprobs shape; everything else is shared."""

    def __init__(self, chat: bool, model: str, strings: TokenStrings, n_choices: int) -> None:
        self.chat = chat
        self.model = model
        self.strings = strings
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets = [0] * n_choices  # legacy text_offset, carried across chunks

    # -- logprobs -------------------------------------------------------------------

    def logprobs(self, index: int, lps: Sequence[TokenLogprobs]) -> dict[str, Any] | None:
        if not lps:
            return None
        if self.chat:
            content = []
            for lp in lps:
                entry = self.strings.chat_entry(lp.token, lp.logprob)
                entry["top_logprobs"] = [self.strings.chat_entry(t, v) for t, v in lp.top]
                content.append(entry)
            return {"content": content}
        body, self._offsets[index] = completion_logprobs(self.strings, lps, self._offsets[index])
        return body

    # -- whole responses ------------------------------------------------------------

    def choice(
        self,
        index: int,
        text: str | None,
        lps: Sequence[TokenLogprobs] | None,
        finish: str | None,
        tool_calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        logprobs = None if lps is None else self.logprobs(index, lps) or _empty(self.chat)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:  # OpenAI: finish_reason "tool_calls", content null when empty
                message["tool_calls"] = [c.as_openai() for c in tool_calls]
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish}  # fmt: skip
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def response(self, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_,
        }

    # -- stream chunks --------------------------------------------------------------

    def chunk(
        self, choices: list[dict[str, Any]], include_usage: bool, usage_: dict | None = None
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if include_usage:  # OpenAI: null on every chunk but the last, which has the totals
            body["usage"] = usage_
        return sse(body)

    def role_choice(self, index: int) -> dict[str, Any]:
        """Chat streams open each choice with the role, as OpenAI's do."""
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}  # fmt: skip

    def delta_choices(
        self, index: int, text: str, lps: Sequence[TokenLogprobs], finish: str | None
    ) -> list[dict[str, Any]]:
        """Choice entries for one engine Delta: none while text is held back (a possible
        stop string), the new text, and for chat a closing entry with an empty delta."""
        logprobs = self.logprobs(index, lps)
        out = []
        if self.chat:
            if text or logprobs:
                out.append({"index": index, "delta": {"content": text}, "logprobs": logprobs,
                            "finish_reason": None})  # fmt: skip
            if finish is not None:
                out.append({"index": index, "delta": {}, "logprobs": None,
                            "finish_reason": finish})  # fmt: skip
        elif text or logprobs or finish is not None:
            out.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": finish})  # fmt: skip
        return out

    def tool_call_choices(self, index: int, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Stream entries for a choice's calls, in OpenAI's shape: per call, one delta
        with its id, type and name, then its arguments (a client joins them by index)."""
        out = []
        for k, call in enumerate(calls):
            head = {"index": k, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}  # fmt: skip
            args = {"index": k, "function": {"arguments": call.arguments}}
            for entry in (head, args):
                out.append({"index": index, "delta": {"tool_calls": [entry]}, "logprobs": None,
                            "finish_reason": None})  # fmt: skip
        return out


def _empty(chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": []}
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
