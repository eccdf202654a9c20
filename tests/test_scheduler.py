"""The scheduler alone: admission, budgets, chunked prefill, cancel -- no model, no tensors."""

from __future__ import annotations

from dataclasses import dataclass

from falconet.engine.scheduler import Budget, schedule


@dataclass(eq=False)
class Seq:
    prompt_len: int
    reserve: int = 1
    cached: int = 0


def budget(max_batch=4, free=100, chunk=8, tokens=16) -> Budget:
    return Budget(max_batch=max_batch, free_units=free, prefill_chunk=chunk, prefill_tokens=tokens)


def test_admits_in_order_up_to_the_batch_size():
    waiting = [Seq(4) for _ in range(6)]
    plan = schedule([], waiting, budget(max_batch=4))
    assert plan.admitted == waiting[:4]
    assert [w.seq for w in plan.work] == waiting[:4]


def test_admission_waits_for_state_rather_than_overtaking():
    big, small = Seq(4, reserve=50), Seq(4, reserve=1)
    plan = schedule([], [Seq(4, reserve=60), big, small], budget(free=100))
    # the second needs 50 of the 40 left: it waits, and the small one behind it waits too
    assert len(plan.admitted) == 1 and plan.admitted[0].reserve == 60


def test_running_sequences_count_against_the_batch():
    running = [Seq(1, cached=1) for _ in range(3)]
    plan = schedule(running, [Seq(2), Seq(2)], budget(max_batch=4))
    assert len(plan.admitted) == 1
    assert len(plan.work) == 4


def test_decoding_sequences_feed_one_token_and_sample():
    seq = Seq(5, cached=7)
    [w] = schedule([seq], [], budget()).work
    assert (w.tokens, w.samples) == (1, True)


def test_long_prompt_is_fed_in_fixed_chunks_and_samples_at_its_end():
    seq = Seq(20)
    fed = []
    while seq.cached < seq.prompt_len:
        [w] = schedule([seq], [], budget(chunk=8, tokens=16)).work
        fed.append((w.tokens, w.samples))
        seq.cached += w.tokens
    assert fed == [(8, False), (8, False), (4, True)]


def test_prefill_budget_spreads_prompts_over_steps_but_never_stops_decoding():
    decoding = Seq(3, cached=3)
    a, b, c = Seq(8), Seq(8), Seq(8)
    plan = schedule([decoding, a, b, c], [], budget(max_batch=8, chunk=8, tokens=16))
    assert [w.seq for w in plan.work] == [decoding, a, b]  # c waits for the next step
    assert plan.work[0].tokens == 1


def test_a_chunk_larger_than_the_budget_still_runs_alone():
    # prefill_tokens below the chunk size is raised to it: a prompt always makes progress
    [w] = schedule([Seq(32)], [], budget(chunk=8, tokens=2)).work
    assert w.tokens == 8


def test_nothing_to_do_is_an_empty_plan():
    plan = schedule([], [], budget())
    assert not plan and plan.admitted == []


def test_a_cancelled_sequence_removed_by_the_engine_frees_its_slot():
    # the engine drops cancelled sequences before it asks for a plan: the slot and the
    # state units they held go to the next waiting sequence
    running = [Seq(1, cached=1, reserve=40) for _ in range(2)]
    waiting = [Seq(4, reserve=40)]
    assert schedule(running, waiting, budget(max_batch=2, free=20)).admitted == []
    after_cancel = running[1:]
    plan = schedule(after_cancel, waiting, budget(max_batch=2, free=60))
    assert plan.admitted == waiting
