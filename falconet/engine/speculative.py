"""Speculative decoding: guess a few tokens cheaply, check them in one forward.

A decoding sequence normally feeds one token per step. With speculation it feeds its
last token and up to k drafted tokens after it; the one packed forward gives the
target model's logits at every one of those positions, and `verify` walks them in order
deciding which drafts the model itself would have produced:

    fed      t  d0  d1  d2          (last token, k = 3 drafts)
    logits   p0 p1  p2  p3          p_j: the next-token distribution after d0..d(j-1)
    verify   p0 picks d0? then p1 picks d1? ... first miss: its own token, and stop;
             all k picked: p_k's token too (k + 1 tokens from one forward)

Greedy rows (temperature 0) take the sampler's own token at each position (argmax after
the request's logit_bias and penalties, the penalties counting the drafts accepted before
it), so the output is exactly plain decoding's. Sampled rows use speculative rejection
sampling (Leviathan et al. 2023, Chen et al. 2023): a draft x is accepted with
probability min(1, p(x)/q(x)), and on rejection the token comes from norm(max(0, p - q)).
Both drafters here propose one token each (q a point mass), so that is: accept x with
probability p(x), else draw from p with x removed, renormalised; every emitted token is
then distributed as plain sampling's. p is the request's processed distribution (bias,
penalties, temperature, top-k/top-p/min-p), exactly as the sampler builds it.

The K/V a verify forward writes for rejected drafts stay past the sequence's `cached`
length: attention never reads past it, the next step overwrites them, and blocks that
only rejected drafts reached go back to the pool (`trim`). Each verified position
attends as its decode step would, one query at a time (paged.py `as_decode`), so its
logits are bit for bit plain decoding's.

Drafters:
    PromptLookup  the latest earlier occurrence of the sequence's last n tokens (n = 3,
                  2, 1) in prompt + output, proposing the k tokens that followed it (no
                  model: RAG answers and code edits copy spans from their prompt);
    DraftModel    a smaller model with the same tokenizer proposing k tokens greedily,
                  with its own paged KV cache kept in step with each sequence.

Where speculation is off, and why:
    a recurrent state (Falcon-Mamba, Falcon-H1) is advanced in place by every token
    fed; rolling it back past rejected drafts would need a state checkpoint per
    drafted position, which the SSM slot pool does not keep;
    dynamic RoPE scaling rotates each step's keys by the length at that step, which
    one forward over several positions does not reproduce;
    a request with logits processors (grammars/structured output, the user's own
    functions): they keep state from call to call (an llguidance matcher consumes the
    tokens it is shown) and would have to score drafted positions that may be rolled
    back; such a request decodes one token per step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from falconet.engine.paged import PagedKVCache
from falconet.engine.state import StepPart
from falconet.errors import GenerationError
from falconet.sampling import Sampler, TokenLogprobs

log = logging.getLogger("falconet.engine")

MODES = ("prompt_lookup", "draft_model")
# Drafted tokens per step, at most. A verify forward's cost grows slowly with its rows
# on a memory-bound decode (the weights are read once for all of them).
DEFAULT_DRAFT_TOKENS = 8
MAX_NGRAM = 3  # longest suffix prompt lookup matches; it falls back to 2, then 1
DRAFT_CHUNK = 256  # prompt tokens a draft model catches up on per step, at most


def model_off_reason(model, pool_class: type) -> str | None:
    """Why speculation cannot run on `model` (None: it can)."""
    if pool_class is not PagedKVCache:
        return (
            "a recurrent (SSM) state is advanced in place by every token fed and cannot be "
            "rolled back past rejected drafts"
        )
    if getattr(model.config, "rope_scaling_type", None) == "dynamic":
        return "dynamic RoPE scaling rotates keys by the length at each decode step"
    return None


def request_off_reason(params) -> str | None:
    """Why one request decodes without speculation (None: it speculates)."""
    if params.logits_processors:
        # a grammar's matcher (constraints.py) and a user's function keep state between
        # calls: they cannot score positions that may be rolled back
        return "logits processors (structured output) see one token per step"
    return None


def make_drafter(
    mode: str | None,
    model,
    pool,
    draft_model,
    draft_tokens: int,
    *,
    max_batch: int,
    max_context: int,
    block_size: int,
    available: int | None,
    memory_share: float,
) -> tuple[Drafter | None, str | None]:
    """(the drafter for `mode`, or None; why speculation is off for this model though
    asked for, or None). GenerationError for a mode or draft model that cannot be."""
    if mode is not None and mode not in MODES:
        raise GenerationError(
            f"speculative must be one of {', '.join(MODES)} or None, got {mode!r}"
        )
    if (mode == "draft_model") != (draft_model is not None):
        raise GenerationError(
            "a draft model goes with speculative='draft_model', and that mode needs one"
        )
    if mode is None:
        return None, None
    reason = model_off_reason(model, type(pool))
    if reason is not None:
        return None, reason
    if draft_model is None:
        return PromptLookup(draft_tokens), None
    drafter = DraftModel(
        draft_model, model.config.vocab_size, max_batch=max_batch, max_context=max_context,
        block_size=block_size, available=available, memory_share=memory_share,
        num_tokens=draft_tokens,
    )  # fmt: skip
    return drafter, None


def first_budget(num_tokens: int) -> int:
    """Drafts a sequence asks for at its first decode step: half the most, so a
    sequence that never copies wastes little before its budget falls."""
    return max(1, num_tokens // 2)


# Steps a sequence skips drafting after its single draft was rejected.
PAUSE_STEPS = 4


def next_budget(budget: int, drafted: int, accepted: int, drafter: Drafter) -> int:
    """The draft length schedule of transformers' assisted generation ("heuristic"):
    two more after a step that accepted every draft, one fewer otherwise, within
    [1, num_tokens]. Rejected drafts cost verify rows; a sequence that copies earns
    longer drafts, one that does not falls to a single draft a step, and when that one
    fails too it pauses: a budget of -n means n + 1 steps without drafts
    (`pause_step`)."""
    if accepted == drafted:
        return min(drafter.num_tokens, budget + 2)
    if budget <= 1 and accepted == 0:
        return -PAUSE_STEPS
    return max(1, budget - 1)


def pause_step(budget: int) -> int:
    """The budget after a decode step taken without drafts while paused (budget < 1)."""
    return budget + 1


class SpeculatingSequence(Protocol):
    """What a drafter reads of a sequence (runner.SequenceState)."""

    prompt: list[int]
    output: list[int]  # tokens generated so far
    draft_state: Any  # the drafter's own per-sequence state


class Drafter(Protocol):
    num_tokens: int

    def propose(self, seqs: list[Any], limits: list[int]) -> list[list[int]]:
        """Up to `limits[i]` drafted tokens after each sequence's prompt + output."""
        ...

    def release(self, seq: Any) -> None:
        """`seq` finished: give back what the drafter holds for it."""
        ...


# ---- prompt lookup ------------------------------------------------------------------


@dataclass
class NgramIndex:
    """A sequence's tokens and, for n = 1..MAX_NGRAM, where each n-gram last ended
    (the position after it), so a lookup costs O(1) per step instead of a scan."""

    tokens: list[int] = field(default_factory=list)
    ends: list[dict[tuple[int, ...], int]] = field(
        default_factory=lambda: [{} for _ in range(MAX_NGRAM)]
    )
    indexed: int = 0  # n-grams ending before this position are in `ends`

    def extend(self, prompt: list[int], output: list[int]) -> None:
        have = len(self.tokens)
        if have < len(prompt):
            self.tokens += prompt[have:]
            have = len(prompt)
        self.tokens += output[have - len(prompt) :]

    def propose(self, k: int) -> list[int]:
        """The k tokens that followed the latest earlier occurrence of the last n
        tokens, longest n first; [] when none occurred before."""
        toks, L = self.tokens, len(self.tokens)
        # index every n-gram ending before the last position: the suffix itself is the
        # query, and its own occurrence has nothing after it
        for end in range(max(self.indexed, 1), L):
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.ends[n - 1][tuple(toks[end - n : end])] = end
        self.indexed = max(self.indexed, L)
        for n in range(min(MAX_NGRAM, L), 0, -1):
            end = self.ends[n - 1].get(tuple(toks[L - n :]))
            if end is not None:
                return toks[end : end + k]
        return []


class PromptLookup:
    """Drafts by n-gram match against the sequence's own prompt and output."""

    def __init__(self, num_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        self.num_tokens = num_tokens

    def propose(self, seqs: list[Any], limits: list[int]) -> list[list[int]]:
        out = []
        for seq, limit in zip(seqs, limits, strict=True):
            if seq.draft_state is None:
                seq.draft_state = NgramIndex()
            seq.draft_state.extend(seq.prompt, seq.output)
            out.append(seq.draft_state.propose(limit) if limit > 0 else [])
        return out

    def release(self, seq: Any) -> None:
        seq.draft_state = None


# ---- draft model --------------------------------------------------------------------


@dataclass(eq=False)
class _DraftSequence:
    """A sequence's state in the draft model's KV cache (a PooledSequence)."""

    prompt: list[int]
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds
    table: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0
    keeps_prompt_rows: bool = False
    block_keys: list[bytes] | None = None
    adapter: str | None = None  # the draft model runs without adapters
    indexed: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


class DraftModel:
    """Drafts with a smaller model of the same tokenizer, greedily: it catches up on
    the tokens its cache lacks (the prompt in chunks of DRAFT_CHUNK, then whatever the
    target accepted), then proposes one token per forward, all sequences packed."""

    def __init__(
        self,
        model,
        vocab_size: int,
        *,
        max_batch: int,
        max_context: int,
        block_size: int,
        available: int | None,
        memory_share: float,
        num_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> None:
        if getattr(model, "state_pool", "paged_kv") != "paged_kv":
            raise GenerationError(
                "a draft model must be an attention model (its KV cache is rolled back "
                "past rejected drafts; a recurrent state cannot be)"
            )
        self.model, self.vocab_size, self.num_tokens = model, vocab_size, num_tokens
        self.pool = PagedKVCache.for_engine(
            model,
            max_batch=max_batch,
            max_context=max_context,
            block_size=block_size,
            kv_cache_tokens=None,
            available=available,
            memory_share=memory_share,
        )

    def propose(self, seqs: list[Any], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        parts, ids, active = [], [], []
        for i, (seq, limit) in enumerate(zip(seqs, limits, strict=True)):
            if limit <= 0:
                continue
            if seq.draft_state is None:
                seq.draft_state = _DraftSequence(seq.prompt)
            state: _DraftSequence = seq.draft_state
            history = seq.prompt + seq.output
            state.cached = _common_prefix(state.fed, history)
            # the last token must be fed (its logits give the first draft), even when
            # the cache holds it already (the same K/V written again)
            state.cached = min(state.cached, len(history) - 1)
            del state.fed[state.cached :]
            feed = history[state.cached : state.cached + DRAFT_CHUNK]
            if not self._grow(state, state.cached + len(feed) + limit):
                continue
            parts.append(StepPart(state, state.cached, len(feed), state.cached + len(feed)))
            ids += feed
            if state.cached + len(feed) == len(history):  # caught up: drafts from here
                active.append((i, len(ids) - 1))
        if not parts:
            return drafts
        rows = [row for _, row in active]
        tokens = self._forward(parts, ids, rows)
        self._record(parts, ids)
        live = []
        for (i, _), t in zip(active, tokens, strict=True):
            drafts[i].append(t)
            if len(drafts[i]) < limits[i]:
                live.append(i)
        while live:  # one drafted token per sequence per forward
            states = [seqs[i].draft_state for i in live]
            parts = [StepPart(s, s.cached, 1, s.cached + 1) for s in states]
            ids = [drafts[i][-1] for i in live]
            tokens = self._forward(parts, ids, list(range(len(live))))
            self._record(parts, ids)
            for i, t in zip(live, tokens, strict=True):
                drafts[i].append(t)
            live = [i for i in live if len(drafts[i]) < limits[i]]
        return drafts

    def _grow(self, state: _DraftSequence, tokens: int) -> bool:
        try:
            self.pool.grow(state, tokens)
        except GenerationError:  # the draft cache is full: this sequence goes undrafted
            return False
        return True

    def _forward(self, parts: list[StepPart], ids: list[int], rows: list[int]) -> list[int]:
        device = self.model.device
        step = self.pool.packed_step(parts, self.model.compute_dtype)
        logits = self.model.forward_packed(
            torch.tensor(ids, device=device),
            step,
            torch.tensor(rows, dtype=torch.long, device=device),
        )
        # ids past the target's vocabulary (a padded draft head) are never proposed
        return logits[:, : self.vocab_size].argmax(dim=-1).tolist()

    @staticmethod
    def _record(parts: list[StepPart], ids: list[int]) -> None:
        at = 0
        for p in parts:
            state: _DraftSequence = p.seq
            del state.fed[p.past :]
            state.fed += ids[at : at + p.length]
            state.cached = p.past + p.length
            at += p.length

    def release(self, seq: Any) -> None:
        if seq.draft_state is not None:
            self.pool.release(seq.draft_state)
            seq.draft_state = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- verification -------------------------------------------------------------------


@dataclass
class Verified:
    """What a verify step emits for one sequence: tokens in order, and how many of them
    were drafts the model accepted (the rest, one token, is its own)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs]
    accepted: int


def verify(
    sampler: Sampler, logits: torch.Tensor, drafts: list[int], want_logprobs: bool
) -> Verified:
    """Tokens from one sequence's verify rows: `logits` (len(drafts) + 1, V), row j the
    next-token logits after the last token and drafts[:j]. The sampler (one row) is
    updated with each token emitted, so its penalties count the drafts before a row."""
    greedy = sampler.params[0].greedy
    tokens: list[int] = []
    lps: list[TokenLogprobs] = []
    for j in range(len(drafts) + 1):
        row = logits[j : j + 1]
        if greedy or j == len(drafts):
            token = sampler.sample(row)  # exactly plain decoding's token
        else:
            token = _accept_or_resample(sampler, row, drafts[j])
        if want_logprobs:
            lps.append(sampler.logprobs(row, token)[0])
        sampler.update(token)
        tokens.append(int(token[0]))
        if j == len(drafts) or tokens[-1] != drafts[j]:
            break
    return Verified(tokens, lps, len(tokens) - 1)


def _accept_or_resample(sampler: Sampler, row: torch.Tensor, draft: int) -> torch.Tensor:
    """A token from p given a point-mass draft: the draft with probability p(draft),
    else one drawn from p without it. Rows the sampler must redo in float64 (overflow)
    draw from p directly: deciding that from the logits alone keeps the law exact."""
    processed = sampler.process_logits(row)[0]
    if bool(processed.isnan().any() or processed.isposinf().any()) or bool(
        (processed == -math.inf).all()
    ):
        return sampler.sample(row)
    probs = torch.softmax(processed, dim=-1)
    generator = sampler.generator(0)
    p_draft = float(probs[draft])
    u = float(torch.rand(1, generator=generator, device=probs.device))
    if u < p_draft:
        return torch.tensor([draft], device=row.device)
    rest = probs.clone()
    rest[draft] = 0.0
    if float(rest.sum()) <= 0.0:  # p is (numerically) all on the draft
        return torch.tensor([draft], device=row.device)
    return torch.multinomial(rest, 1, generator=generator)
