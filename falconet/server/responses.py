"""OpenAI response bodies: completion and chat choices, stream chunks, logprobs, usage."""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from tokenizers import decoders

from falconet.sampling import TokenLogprobs
from falconet.tokenizer import Tokenizer

DONE = b"data: [DONE]\n\n"
# JSON has no -inf; vLLM sends this for a token the model gives no chance at all.
LOGPROB_FLOOR = -9999.0


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        + b"\n\n"
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted: character -> byte. Byte-level
    BPE vocabularies (Falcon's) spell every token's bytes in these characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenStrings:
    """How logprobs show a token: its raw bytes, and its text. A token that is not whole
    UTF-8 on its own (part of an emoji) is written "bytes:\\xf0\\x9f" as OpenAI does,
    never as replacement characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        self._fallback = tokenizer.byte_fallback_ids
        self._cache: dict[int, tuple[bytes, str]] = {}

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and self._byte_level:
            table = _byte_level_alphabet()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if piece is not None and token_id in self._fallback:  # "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def get(self, token_id: int) -> tuple[bytes, str]:
        if token_id not in self._cache:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._cache[token_id] = (raw, text)
        return self._cache[token_id]

    def text(self, token_id: int) -> str:
        return self.get(token_id)[1]

    def chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw, text = self.get(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(raw)}


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
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            text = self.strings.text(lp.token)
            tokens.append(text)
            values.append(_lp(lp.logprob))
            top = {self.strings.text(t): _lp(v) for t, v in lp.top}
            # OpenAI: "the API will always return the logprob of the sampled token"
            top.setdefault(text, _lp(lp.logprob))
            tops.append(top)
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    # -- whole responses ------------------------------------------------------------

    def choice(
        self, index: int, text: str, lps: Sequence[TokenLogprobs] | None, finish: str | None
    ) -> dict[str, Any]:
        logprobs = None if lps is None else self.logprobs(index, lps) or _empty(self.chat)
        if self.chat:
            message = {"role": "assistant", "content": text}
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


def _empty(chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": []}
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
