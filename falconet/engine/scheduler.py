"""The scheduler: which sequences run in the next step, and how many tokens each feeds.

A pure function of the queue and the budgets -- no model, no tensors, no locks -- so it is
tested on plain objects (tests/test_scheduler.py). The engine applies the plan it returns.

    admit      waiting sequences join the running set, first come first served, while a
               batch slot is free and the per-sequence state pool can promise their whole
               budget (prompt + max_tokens): a running sequence never has to be preempted.
               The state is counted in the pool's own units (KV blocks, a recurrent model's
               state slots, or a tuple of both compared element-wise), so the scheduler
               never assumes attention. A sequence starting from a cached prefix
               (engine/prefix.py) comes with `cached` past it and a `reserve` that leaves
               out the blocks it shares.
    feed       every decoding sequence feeds its last token; a prefilling sequence feeds the
               next chunk of its prompt, up to a per-step prefill budget, so a long prompt is
               spread over several steps and never freezes the streams already running.
               Chunk boundaries are multiples of `prefill_chunk` from the start of the prompt
               whatever the load, so a sequence computes the same numbers alone or in a crowd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# State units: an int for a pool of one kind, a tuple for a pool holding several (KV
# blocks and SSM slots), compared and counted element-wise.
Units = int | tuple[int, ...]


def fits(need: Units, free: Units) -> bool:
    if isinstance(need, int):
        return need <= free  # type: ignore[operator]
    return all(n <= f for n, f in zip(need, free, strict=True))  # type: ignore[arg-type]


def add_units(a: Units, b: Units, sign: int = 1) -> Units:
    """a + b (a - b with sign=-1), element-wise for tuples."""
    if isinstance(a, int):
        return a + sign * b  # type: ignore[operator]
    return tuple(x + sign * y for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]


class Schedulable(Protocol):
    """What the scheduler reads of a sequence."""

    @property
    def prompt_len(self) -> int: ...

    @property
    def cached(self) -> int: ...  # tokens already in the sequence's model state

    @property
    def reserve(self) -> Units: ...  # state units admitting it takes for its whole budget


@dataclass(frozen=True)
class Budget:
    """The limits of one step."""

    max_batch: int  # sequences running at once
    free_units: Units  # state units not yet promised to a running sequence
    prefill_chunk: int  # prompt tokens one sequence feeds per step, at most
    prefill_tokens: int  # prompt tokens all sequences feed per step, at most (>= prefill_chunk)


@dataclass(frozen=True)
class Work:
    """One sequence's share of a step: `tokens` new tokens after `seq.cached`."""

    seq: Schedulable
    tokens: int
    samples: bool  # the step reaches the end of its prompt: sample a token from its logits


@dataclass
class StepPlan:
    admitted: list[Schedulable] = field(default_factory=list)  # leave waiting, now running
    work: list[Work] = field(default_factory=list)  # in running order (admitted last)

    def __bool__(self) -> bool:
        return bool(self.work)


def schedule(
    running: Sequence[Schedulable], waiting: Sequence[Schedulable], budget: Budget
) -> StepPlan:
    """Admit from `waiting` (oldest first) and plan one step over every running sequence."""
    plan = StepPlan()
    free = budget.free_units
    for seq in waiting:
        if len(running) + len(plan.admitted) >= budget.max_batch or not fits(seq.reserve, free):
            break  # first come, first served: wait for room rather than overtake
        plan.admitted.append(seq)
        free = add_units(free, seq.reserve, -1)
    prefill_left = max(budget.prefill_tokens, budget.prefill_chunk)
    for seq in [*running, *plan.admitted]:
        remaining = seq.prompt_len - seq.cached
        if remaining <= 0:  # decoding: its last sampled token
            plan.work.append(Work(seq, 1, True))
            continue
        tokens = min(budget.prefill_chunk, remaining)
        if tokens > prefill_left:
            continue  # this step's prefill budget is spent; it goes next step
        prefill_left -= tokens
        plan.work.append(Work(seq, tokens, tokens == remaining))
    return plan
