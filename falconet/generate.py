"""The text side of generation, shared by every face through the engine: token ids ->
text pieces that are always whole UTF-8 characters, with stop strings held back (even
split across tokens) and cut; the `Completion` a finished request returns; and how
logprobs and token counts are shown (the OpenAI shapes the server and
`falconet generate --json` both print, built here once).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import decoders

from falconet.sampling import TokenLogprobs
from falconet.tokenizer import StreamDecoder, Tokenizer

# JSON has no -inf; vLLM sends this for a token the model gives no chance at all.
LOGPROB_FLOOR = -9999.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# ---- text ---------------------------------------------------------------------------
class StopStringFilter:
    """Turns a stream of text pieces into pieces that never contain (or leak the start
    of) a stop string, even when the string arrives split across tokens."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max(_overlap(self.pending, s) for s in self.stop)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class SequenceText:
    """One sequence's tokens -> text pieces: streaming-safe UTF-8, stop strings held back
    and cut. Special tokens (eos) are not part of the text."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.filter = StopStringFilter(stop)

    def add(self, token_id: int, stop_token: bool, finish: str | None) -> tuple[str, str | None]:
        """Append a token; returns the new text and the finish reason, which becomes
        "stop" when a stop string completes (the caller then ends the sequence)."""
        text = "" if stop_token else self.filter.push(self.decoder.add(token_id))
        if self.filter.stopped:
            return text, "stop"
        if finish is not None:
            text += self.filter.push(self.decoder.flush()) + self.filter.flush()
        return text, finish


# ---- logprobs and usage as OpenAI shows them ------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finite_logprob(x: float) -> float:
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
        """One token of the chat API's logprobs `content`."""
        raw, text = self.get(token_id)
        return {"token": text, "logprob": finite_logprob(logprob), "bytes": list(raw)}


def completion_logprobs(
    strings: TokenStrings, lps: Sequence[TokenLogprobs], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The legacy /v1/completions logprobs object for `lps` (tokens, token_logprobs,
    top_logprobs, text_offset), its offsets counted from `offset` (a stream carries it
    across chunks), and the offset after its last token."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = strings.text(lp.token)
        tokens.append(text)
        values.append(finite_logprob(lp.logprob))
        top: dict[str, float] = {}
        for t, v in lp.top:  # ids that read alike (ids past the tokenizer's vocabulary
            top.setdefault(strings.text(t), finite_logprob(v))  # all read ""): the likeliest
        # OpenAI: "the API will always return the logprob of the sampled token"
        top.setdefault(text, finite_logprob(lp.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    body = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip
    return body, offset
