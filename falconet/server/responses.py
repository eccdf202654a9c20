"""OpenAI response bodies: completion and chat choices, stream chunks. The logprobs
object and usage counts are built in falconet/generate.py, shared with the CLI.

A /v1/completions choice may show its prompt (`PromptShow`), as vLLM does: with `echo`
the prompt's text comes before the completion and, with `logprobs`, the prompt's tokens
before the completion's in the legacy logprobs object, the first with `null`s (nothing
comes before it); vLLM's `prompt_logprobs` field lists the same tokens as
`{token id: {logprob, rank, decoded_token}}`, the first `null`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from falconet.generate import TokenStrings, completion_logprobs, finite_logprob
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


@dataclass
class PromptShow:
    """What each /v1/completions choice shows of its prompt (one entry per choice)."""

    ids: list[list[int]]
    echo_texts: list[str] | None  # None: no echo
    logprobs: int | None  # alternatives per echoed token in the legacy object; None: off
    field: int | None  # vLLM's prompt_logprobs field: alternatives per token; None: off


class Formatter:
    """Builds the bodies of one request. `completion` (legacy /v1/completions) and chat
    differ in the choice shape and the logprobs shape; everything else is shared."""

    def __init__(
        self, chat: bool, model: str, strings: TokenStrings, n_choices: int,
        prompts: PromptShow | None = None,
    ) -> None:  # fmt: skip
        self.chat = chat
        self.model = model
        self.strings = strings
        self.prompts = prompts
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets = [0] * n_choices  # legacy text_offset, carried across chunks
        self._echoed = [False] * n_choices  # a stream echoes the prompt in its first chunk

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

    # -- the prompt (/v1/completions) -------------------------------------------------

    def _echo(
        self, index: int, prompt_lps: Sequence[TokenLogprobs] | None
    ) -> tuple[str, dict[str, Any] | None]:
        """The echoed text of choice `index`'s prompt and, with logprobs, the legacy
        logprobs of its tokens; ("", None) without echo. Call before the completion's
        own logprobs: their text offsets continue from the prompt's."""
        show = self.prompts
        if show is None or show.echo_texts is None or self._echoed[index]:
            return "", None
        self._echoed[index] = True
        if show.logprobs is None:
            return show.echo_texts[index], None
        ids = show.ids[index]
        first = self.strings.text(ids[0])
        shown = [TokenLogprobs(lp.token, lp.logprob, lp.top[: show.logprobs])
                 for lp in prompt_lps or ()]  # fmt: skip
        body, self._offsets[index] = completion_logprobs(self.strings, shown, len(first))
        head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None],
                "text_offset": [0]}  # fmt: skip
        return show.echo_texts[index], {key: head[key] + body[key] for key in head}

    def prompt_logprobs(
        self, prompt_lps: Sequence[TokenLogprobs] | None
    ) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs`: null for the first token, then each token's entry
        (first) and its top alternatives, keyed by token id."""
        k = self.prompts.field if self.prompts is not None else 0
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for lp in prompt_lps or ():
            ranked = [(lp.token, lp.logprob, lp.rank)]
            ranked += [(t, v, r) for r, (t, v) in enumerate(lp.top[:k], 1) if t != lp.token]
            out.append({str(t): {"logprob": finite_logprob(v), "rank": r,
                                 "decoded_token": self.strings.text(t)}
                        for t, v, r in ranked})  # fmt: skip
        return out

    # -- whole responses ------------------------------------------------------------

    def choice(
        self,
        index: int,
        text: str | None,
        lps: Sequence[TokenLogprobs] | None,
        finish: str | None,
        prompt_lps: Sequence[TokenLogprobs] | None = None,
        tool_calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        echo, echo_lps = self._echo(index, prompt_lps)
        logprobs = None if lps is None else self.logprobs(index, lps) or _empty(self.chat)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:  # OpenAI: finish_reason "tool_calls", content null when empty
                message["tool_calls"] = [c.as_openai() for c in tool_calls]
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish}  # fmt: skip
        out = {"index": index, "text": echo + text, "logprobs": _joined(echo_lps, logprobs),
               "finish_reason": finish}  # fmt: skip
        if self.prompts is not None and self.prompts.field is not None:
            out["prompt_logprobs"] = self.prompt_logprobs(prompt_lps)
        return out

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
        self, index: int, text: str, lps: Sequence[TokenLogprobs], finish: str | None,
        prompt_lps: Sequence[TokenLogprobs] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Choice entries for one engine Delta: none while text is held back (a possible
        stop string), the new text, and for chat a closing entry with an empty delta. A
        choice's first Delta brings the echoed prompt with it, as vLLM's streams do."""
        echo, echo_lps = self._echo(index, prompt_lps)
        text = echo + text
        logprobs = _joined(echo_lps, self.logprobs(index, lps))
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


def _joined(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two legacy logprobs objects as one, a's tokens first."""
    if a is None or b is None:
        return a if b is None else b
    return {key: a[key] + b[key] for key in a}


def _empty(chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": []}
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
