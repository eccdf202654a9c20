"""Generation, in layers: prefill -> decode_step -> a generator of tokens -> a generator of
text pieces that holds back what may still turn into a stop string or an incomplete
UTF-8 character.

A batch is left-padded and decoded in lock step with a static KV cache; rows that finish
leave the batch (their cache rows are dropped) so the others run at their own cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from falconet.attention import prefill_chunk_size
from falconet.cache import KVCache
from falconet.errors import GenerationError
from falconet.model import Falcon
from falconet.sampling import Sampler, SamplingParams, TokenLogprobs
from falconet.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenEvent:
    row: int
    token_id: int
    finish_reason: str | None  # None while the row goes on, else "stop" or "length"
    logprob: TokenLogprobs | None = None
    stop_token: bool = False  # the token is an eos / stop token: not part of the text


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


# ---- model steps --------------------------------------------------------------------
def prefill(
    model: Falcon,
    ids: torch.Tensor,
    valid: torch.Tensor,
    cache: KVCache,
    all_logits: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns fp32 logits of the last
    position (B, V), or of every position (B, T, V) with `all_logits`.

    Chunking bounds the attention mask (and activations) so memory grows linearly
    with the prompt, and gives exactly the unchunked result up to float rounding.
    """
    B, T = ids.shape
    chunk = chunk or prefill_chunk_size(model.config, B, cache.length + T)
    rope_len = cache.next_position + valid.long().sum(-1)  # every chunk rotates as one forward
    outs = []
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        logits = model(ids[:, start:stop], cache, valid[:, start:stop], not all_logits, rope_len)
        outs.append(logits.float())
    return torch.cat(outs, dim=1) if all_logits else outs[-1][:, -1]


def decode_step(model: Falcon, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row (B,) -> next-token fp32 logits (B, V)."""
    return model(tokens[:, None], cache, last_only=True)[:, -1].float()


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p) :] = True
    return ids, valid


# ---- tokens -------------------------------------------------------------------------
@torch.inference_mode()  # as a decorator it is entered per resume, so it never leaks to the caller
def generate_tokens(
    model: Falcon,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: tuple[int, ...] = (),
    cancelled: set[int] | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yield, per decode step, one TokenEvent for every row still running.

    Rows are identified by their index in `prompts`. A row whose index the caller adds
    to `cancelled` (e.g. a stop string was seen in its text) leaves the batch at the
    next step.
    """
    if len(prompts) != len(params) or not prompts:
        raise GenerationError(
            "generate: need one SamplingParams per prompt and at least one prompt"
        )
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"generate: prompt {i} is empty; give at least one token")
        vocab = model.config.vocab_size
        if min(p) < 0 or max(p) >= vocab:
            raise GenerationError(f"generate: prompt {i} has a token id outside [0, {vocab})")
    cancelled = cancelled if cancelled is not None else set()
    device = model.device
    max_new = max(p.max_tokens for p in params)
    ids, valid = left_pad(prompts, device)
    cache = KVCache(model.config, len(prompts), ids.shape[1] + max_new, model.compute_dtype, device)
    stop_ids = [set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids)) for p in params]
    sampler = Sampler(list(params), prompts, model.config.vocab_size, device=device)
    rows = list(range(len(prompts)))
    produced = [0] * len(prompts)

    logits = prefill(model, ids, valid, cache)
    while rows:
        tokens = sampler.sample(logits)
        want_lp = any(params[r].logprobs is not None for r in rows)
        lps = sampler.logprobs(logits, tokens) if want_lp else None  # per-row k
        sampler.update(tokens)
        events, keep = [], []
        for j, row in enumerate(rows):
            tok = int(tokens[j])
            produced[row] += 1
            by_token = tok in stop_ids[row]
            finish = (
                "stop"
                if by_token
                else ("length" if produced[row] >= params[row].max_tokens else None)
            )
            events.append(
                TokenEvent(row, tok, finish, lps[j] if lps is not None else None, by_token)
            )
            if finish is None:
                keep.append(j)
        yield events
        keep = [j for j in keep if rows[j] not in cancelled]
        if not keep:
            return
        if len(keep) != len(rows):
            cache.select(keep)
            sampler = sampler.select(keep)
            tokens = tokens[keep]
            rows = [rows[j] for j in keep]
        logits = decode_step(model, tokens, cache)


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


@dataclass
class TextEvent:
    row: int
    text: str
    token_id: int | None
    finish_reason: str | None
    logprob: TokenLogprobs | None = None


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


def generate_text(
    model: Falcon,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: tuple[int, ...] = (),
) -> Iterator[TextEvent]:
    """Yield text pieces per row: valid UTF-8, stop strings removed; the last event of a
    row carries its finish_reason."""
    cancelled: set[int] = set()
    texts = [SequenceText(tokenizer, p.stop) for p in params]
    for events in generate_tokens(model, prompts, params, eos_ids, cancelled):
        for ev in events:
            text, finish = texts[ev.row].add(ev.token_id, ev.stop_token, ev.finish_reason)
            if finish == "stop" and texts[ev.row].filter.stopped:
                cancelled.add(ev.row)
            yield TextEvent(ev.row, text, ev.token_id, finish, ev.logprob)


def complete(
    model: Falcon,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: tuple[int, ...] = (),
) -> list[Completion]:
    """Run `generate_text` to the end for every row."""
    texts = [""] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[TokenLogprobs]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    for ev in generate_text(model, tokenizer, prompts, params, eos_ids):
        texts[ev.row] += ev.text
        if ev.token_id is not None:
            tokens[ev.row].append(ev.token_id)
        if ev.logprob is not None:
            logprobs[ev.row].append(ev.logprob)
        if ev.finish_reason is not None:
            finish[ev.row] = ev.finish_reason
    return [
        Completion(
            texts[i],
            tokens[i],
            finish[i],
            len(prompts[i]),
            logprobs[i] if params[i].logprobs is not None else None,
        )
        for i in range(len(prompts))
    ]
