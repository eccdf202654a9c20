"""The model runner: executes one step's plan and samples.

It grows each scheduled sequence's model state (its KV blocks, or its SSM slot: the
model's state pool, state.py) to cover the new tokens, packs every sequence's new tokens
into one row (decode tokens and prefill chunks side by side), runs the model once through
the pool's packed step, and samples per sequence with the
sequence's own sampler and seeded generator. Everything it computes for a sequence
depends only on that sequence (row-invariant Linear, per-sequence attention and
sampling), so batching never changes a result.

That independence also isolates faults. Sampling (and the user's logits processors) runs
per sequence: one that raises fails that sequence alone. A forward that raises is
retried on each half of the batch, down to single sequences, so only the sequences that
fail on their own are failed; the others get the numbers they would have got in the
full batch. Retrying is safe because a forward only writes each sequence's K/V at its
new positions (the same values again) and sequence state advances only after it; a
recurrent state, which a forward advances in place, is snapshot before a forward that
may be retried and restored before the retry. A sequence that starts from a cached
prefix (prefix.py) has `cached` at the prefix's end when it first runs; its forwards
write only after it, never into the shared blocks.

LoRA adapters (nn/lora.py): a sequence may name one of the adapters the runner serves;
the forward runs inside `adapter_rows`, which tells each hooked layer the packed rows of
each adapter, so sequences of different adapters (and of none) share one forward.

Speculative decoding (speculative.py): with a drafter, a decoding sequence feeds its last
token and the tokens drafted after it; its logits at each of those positions are
verified in order and it emits the accepted drafts plus one token of its own, each as a
`Sampled` of its own, in order. Its `cached` then counts only the positions it kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from falconet.engine.scheduler import Units, Work
from falconet.engine.speculative import (
    Drafter,
    first_budget,
    next_budget,
    pause_step,
    request_off_reason,
    verify,
)
from falconet.engine.state import StatePool, StepPart
from falconet.nn.lora import LoRALayers, adapter_rows
from falconet.sampling import Sampler, SamplingParams, TokenLogprobs, prompt_logprobs

log = logging.getLogger("falconet.engine")


@dataclass(eq=False)
class SequenceState:
    """What the runner keeps of a sequence between steps."""

    prompt: list[int]
    params: SamplingParams
    units: Units  # state units (KV blocks, SSM slot) prompt + max_tokens take at most
    want_prompt_logits: bool = False  # keep the logits of every prompt position
    generates: bool = True  # False: score the prompt only (perplexity, LLM.logits)
    table: list[int] = field(default_factory=list)  # KV block table
    slot: int | None = None  # SSM state slot
    cached: int = 0  # tokens in the model state (from the start: a cached prefix)
    # what admission takes from the pool: `units` less the units of a cached prefix
    # that running sequences hold already (the engine prices it before each step)
    reserve: Units | None = None
    block_keys: list[bytes] | None = None  # prefix-cache keys of its prompt's blocks
    adapter: str | None = None  # the LoRA adapter its rows get (nn/lora.py), None: the base
    indexed: int = 0  # blocks of its table found in or added to the prefix cache
    last_token: int = -1
    sampler: Sampler | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # fp32 (n, V) chunks
    # params.prompt_logprobs: prompt tokens 1.. scored as their chunks run (token 0 has
    # nothing before it), so only k + 1 numbers per token outlive the step
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    output: list[int] = field(default_factory=list)  # tokens generated so far
    speculates: bool | None = None  # decided at its first decode step (speculative.py)
    draft_budget: int = 0  # drafts to ask for next (speculative.next_budget), 0: not yet
    draft_state: Any = None  # the drafter's own state for it

    def __post_init__(self) -> None:
        if self.reserve is None:
            self.reserve = self.units

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def keeps_prompt_rows(self) -> bool:
        """The prefill computes logits at every prompt position, not only the last. A
        prefix cache must not skip such a sequence's prompt: its logits are the answer."""
        return self.want_prompt_logits or self.params.prompt_logprobs is not None


@dataclass
class Sampled:
    """The token a step produced for one sequence."""

    seq: SequenceState
    token: int
    logprobs: list[TokenLogprobs]  # [one] when params.logprobs is set, else []


@dataclass
class Failed:
    """A sequence this step could not process: it ends with `error`, the others go on."""

    seq: SequenceState
    error: str


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class ModelRunner:
    def __init__(
        self,
        model,
        pool: StatePool,
        drafter: Drafter | None = None,
        adapters: LoRALayers | None = None,
    ) -> None:
        self.model, self.pool, self.drafter = model, pool, drafter
        self.adapters = adapters  # the LoRA adapters sequences may name (nn/lora.py)
        self.drafted = 0  # tokens drafted since the start
        self.accepted = 0  # of those, accepted by the model

    def release(self, seq: SequenceState) -> None:
        """Give back everything a finished or cancelled `seq` holds."""
        self.pool.release(seq)
        if self.drafter is not None:
            self.drafter.release(seq)

    def execute(self, work: list[Work]) -> list[Sampled | Failed]:
        """One forward over the planned tokens, then sampling for the sequences whose
        prompt is done. Call inside `torch.inference_mode()` and `batch_invariant()`.
        Never raises for a sequence's fault: such a sequence comes back as `Failed`."""
        drafts = self._draft(work)
        try:
            logits, scored = self._forward(work, drafts)
        except Exception as e:
            if len(work) == 1:
                log.warning("a sequence's forward failed alone: %s", describe(e))
                return [Failed(work[0].seq, describe(e))]
            # Find the culprits by halving; the innocent finish this step all the same.
            log.warning(
                "a forward of %d sequences failed (%s); retrying in halves", len(work), describe(e)
            )
            half = len(work) // 2
            return self.execute(work[:half]) + self.execute(work[half:])
        out: list[Sampled | Failed] = []
        at = 0
        for (seq, n, rows, samples), drafted in zip(scored, drafts, strict=True):
            mine = logits[at : at + rows]
            at += rows
            try:
                if seq.cached < seq.prompt_len:
                    self._keep_prompt_rows(seq, mine)
                seq.cached += n
                self.pool.commit(seq)  # its new full prompt blocks, for later sequences
                if drafted:
                    out += self._verify(seq, mine, drafted)
                elif samples and seq.generates:
                    out.append(self._sample(seq, mine[-1:]))
            except Exception as e:  # this sequence's sampling or processors: it alone ends
                log.warning("sampling failed for one sequence: %s", describe(e))
                out.append(Failed(seq, describe(e)))
        return out

    def _draft(self, work: list[Work]) -> list[list[int] | None]:
        """Drafted tokens per work item (None or [] where it does not speculate). A
        draft never takes a sequence past max_tokens: the drafts and the model's own
        token fit in what it may still generate, so its reserved state holds them."""
        drafts: list[list[int] | None] = [None] * len(work)
        if self.drafter is None:
            return drafts
        at, seqs, limits = [], [], []
        for i, w in enumerate(work):
            seq: SequenceState = w.seq  # type: ignore[assignment]
            if seq.cached < seq.prompt_len or not seq.generates:
                continue
            if seq.speculates is None:
                seq.speculates = request_off_reason(seq.params) is None
                seq.draft_budget = first_budget(self.drafter.num_tokens)
            if seq.draft_budget < 1:  # paused after drafts that kept failing
                seq.draft_budget = pause_step(seq.draft_budget)
                continue
            limit = min(seq.draft_budget, seq.params.max_tokens - len(seq.output) - 1)
            if seq.speculates and limit > 0:
                at.append(i)
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return drafts
        try:
            proposed = self.drafter.propose(seqs, limits)
        except Exception as e:  # drafts only save time: the step goes on without them
            log.warning("drafting failed (%s); this step decodes one token each", describe(e))
            for seq in seqs:
                self.drafter.release(seq)
            return drafts
        for i, d in zip(at, proposed, strict=True):
            drafts[i] = d
        return drafts

    def _forward(
        self, work: list[Work], drafts: list[list[int] | None]
    ) -> tuple[torch.Tensor, list[tuple]]:
        """The packed forward; no sequence's state changes here but its pool handles
        (grown to the new length, which a retry finds already done) and, for a recurrent
        model, its state, which is restored when the forward raises."""
        parts, ids, logit_rows, scored = [], [], [], []
        for w, drafted in zip(work, drafts, strict=True):
            seq: SequenceState = w.seq  # type: ignore[assignment]
            if seq.cached >= seq.prompt_len:  # decoding
                tokens = [seq.last_token, *(drafted or ())]
                rope_len = seq.cached + len(tokens)
            else:
                tokens = seq.prompt[seq.cached : seq.cached + w.tokens]
                rope_len = seq.prompt_len  # a chunked prompt rotates as one forward
            self.pool.grow(seq, seq.cached + len(tokens))
            parts.append(StepPart(seq, seq.cached, len(tokens), rope_len, bool(drafted)))
            start = len(ids)
            ids += tokens
            prefilling = seq.cached < seq.prompt_len
            rows = list(range(start, len(ids))) if prefilling and seq.keeps_prompt_rows else []
            if drafted:  # every position verifies one token
                rows = list(range(start, len(ids)))
            if w.samples and seq.generates and not rows:
                rows = [len(ids) - 1]
            logit_rows += rows
            scored.append((seq, len(tokens), len(rows), w.samples))
        device = self.model.device
        step = self.pool.packed_step(parts, self.model.compute_dtype)
        # only a batch is retried (a lone sequence that fails is failed), so only a
        # batch pays for the snapshot
        snapshot = self.pool.snapshot([p.seq for p in parts]) if len(parts) > 1 else None
        rows = None
        if self.adapters is not None:  # which packed rows each adapter updates
            rows = self.adapters.rows(
                [(p.seq.adapter, p.length, p.past < p.seq.prompt_len) for p in parts]
            )
        try:
            with adapter_rows(rows):
                logits = self.model.forward_packed(
                    torch.tensor(ids, device=device),
                    step,
                    torch.tensor(logit_rows, dtype=torch.long, device=device),
                ).float()
        except Exception:
            if snapshot is not None:
                self.pool.restore(snapshot)
            raise
        return logits, scored

    @staticmethod
    def _keep_prompt_rows(seq: SequenceState, rows: torch.Tensor) -> None:
        """A prefill chunk's logits (one row per token fed): kept whole for
        `want_prompt_logits`, or turned into logprobs of the prompt tokens they predict."""
        if seq.want_prompt_logits:
            seq.prompt_logits.append(rows)
        k = seq.params.prompt_logprobs
        if k is not None:
            # row i sits at position cached + i and predicts the prompt token after it;
            # the last prompt position predicts the first generated token instead
            targets = seq.prompt[seq.cached + 1 : seq.cached + 1 + rows.shape[0]]
            if targets:
                seq.prompt_logprobs += prompt_logprobs(rows, targets, k)

    @staticmethod
    def _sampler(seq: SequenceState, logits: torch.Tensor) -> Sampler:
        if seq.sampler is None:
            seq.sampler = Sampler(
                [seq.params], [seq.prompt], logits.shape[-1], device=logits.device
            )
        return seq.sampler

    def _sample(self, seq: SequenceState, logits: torch.Tensor) -> Sampled:
        sampler = self._sampler(seq, logits)
        token = sampler.sample(logits)
        lps = []
        if seq.params.logprobs is not None:
            lps = [sampler.logprobs(logits, token)[0]]
        sampler.update(token)
        seq.last_token = int(token[0])
        seq.output.append(seq.last_token)
        return Sampled(seq, seq.last_token, lps)

    def _verify(
        self, seq: SequenceState, logits: torch.Tensor, drafted: list[int]
    ) -> list[Sampled]:
        """The tokens a verify forward gives `seq` (its accepted drafts, then its own);
        `cached` drops the positions of the rejected drafts."""
        want = seq.params.logprobs is not None
        v = verify(self._sampler(seq, logits), logits, drafted, want)
        seq.cached -= len(drafted) - v.accepted
        seq.draft_budget = next_budget(seq.draft_budget, len(drafted), v.accepted, self.drafter)
        self.pool.trim(seq, seq.cached)  # blocks follow the kept length, as without drafts
        self.drafted += len(drafted)
        self.accepted += v.accepted
        seq.last_token = v.tokens[-1]
        seq.output += v.tokens
        return [Sampled(seq, t, [v.logprobs[i]] if want else []) for i, t in enumerate(v.tokens)]
