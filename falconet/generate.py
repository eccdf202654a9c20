"""The text side of generation, shared by every face through the engine: token ids ->
text pieces that are always whole UTF-8 characters, with stop strings held back (even
split across tokens) and cut; and the `Completion` a finished request returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from falconet.sampling import TokenLogprobs
from falconet.tokenizer import StreamDecoder, Tokenizer


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
