"""The engine's state pools alone, no model: SSM slots (one per sequence, zeroed when
taken, returned on release, snapshot and restore), KV blocks as units, and admission
counted in units -- tuples of them too, as a pool holding KV blocks and an SSM slot
(Falcon-H1) will give."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from falconet.engine.paged import PagedKVCache
from falconet.engine.scheduler import Budget, add_units, fits, schedule
from falconet.engine.state import SSMSlotPool, StepPart
from falconet.errors import GenerationError
from falconet.models.falcon_config import FalconConfig


@dataclass(eq=False)
class Seq:
    prompt_len: int = 4
    reserve: object = 1
    cached: int = 0
    table: list[int] = field(default_factory=list)
    slot: int | None = None


def pool(slots: int = 3) -> SSMSlotPool:
    # 2 layers, 6 channels, conv width 3, state 5
    return SSMSlotPool(2, (6, 3), (6, 5), slots)


def test_a_slot_is_one_unit_whatever_the_length():
    p = pool()
    assert [p.units_for(n) for n in (1, 100, 10**6)] == [1, 1, 1]
    assert p.slot_bytes() == 2 * 6 * (3 * 4 + 5 * 4)  # fp32 conv and SSM state, all layers


def test_slots_are_taken_zeroed_and_given_back():
    p = pool(2)
    p.conv.fill_(7.0)
    p.ssm.fill_(7.0)
    a, b, c = Seq(), Seq(), Seq()
    p.grow(a, 5)
    p.grow(b, 1)
    assert {a.slot, b.slot} == {0, 1} and p.used == 2
    assert p.conv[:, a.slot].abs().sum() == 0 and p.ssm[:, b.slot].abs().sum() == 0
    p.ssm[:, a.slot] = 3.0
    p.grow(a, 50)  # growing again keeps the slot and its state
    assert p.ssm[:, a.slot].eq(3.0).all() and p.used == 2
    with pytest.raises(GenerationError, match="out of slots"):
        p.grow(c, 1)
    p.release(a)
    assert a.slot is None and p.used == 1
    p.grow(c, 1)
    assert p.used == 2 and p.ssm[:, c.slot].abs().sum() == 0  # a fresh start
    p.release(a)  # releasing twice gives nothing back twice
    assert p.used == 2


def test_snapshot_and_restore_undo_a_forward():
    p = pool(3)
    seqs = [Seq() for _ in range(3)]
    for s in seqs:
        p.grow(s, 1)
    torch.manual_seed(0)
    p.conv.normal_()
    p.ssm.normal_()
    conv, ssm = p.conv.clone(), p.ssm.clone()
    snap = p.snapshot(seqs[:2])
    p.conv.add_(1.0)  # a forward advanced every state, then failed
    p.ssm.mul_(2.0)
    p.restore(snap)
    for s in seqs[:2]:
        assert torch.equal(p.conv[:, s.slot], conv[:, s.slot])
        assert torch.equal(p.ssm[:, s.slot], ssm[:, s.slot])
    assert torch.equal(p.ssm[:, seqs[2].slot], ssm[:, seqs[2].slot] * 2)  # not in the step


def test_slot_step_hands_each_sequence_its_rows_and_state_views():
    p = pool(3)
    a, b = Seq(), Seq()
    p.grow(a, 1)
    p.grow(b, 1)
    step = p.packed_step([StepPart(a, 0, 4, 4), StepPart(b, 9, 1, 10)], torch.float32)
    assert step.tokens == 5
    (rows_a, conv_a, ssm_a), (rows_b, _, ssm_b) = step.states(1)
    assert (rows_a, rows_b) == (slice(0, 4), slice(4, 5))
    assert conv_a.shape == (1, 6, 3) and ssm_b.shape == (1, 6, 5)
    ssm_a.fill_(5.0)  # a view: the model advances the pool in place
    assert p.ssm[1, a.slot].eq(5.0).all() and p.ssm[0, a.slot].eq(0.0).all()


def test_kv_blocks_are_units_of_the_same_interface():
    config = FalconConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, num_hidden_layers=1)
    kv = PagedKVCache(config, num_blocks=4, block_size=4)
    assert [kv.units_for(n) for n in (1, 4, 5, 16)] == [1, 1, 2, 4]
    with pytest.raises(GenerationError, match="lower max_tokens"):
        kv.units_for(17)
    s = Seq()
    kv.grow(s, 6)
    assert len(s.table) == 2 and kv.used == 2 and kv.snapshot([s]) is None
    kv.release(s)
    assert s.table == [] and kv.used == 0


def test_units_compare_element_wise():
    assert fits(2, 2) and not fits(3, 2)
    assert fits((3, 1), (5, 1)) and not fits((3, 2), (5, 1)) and not fits((6, 0), (5, 1))
    assert add_units((5, 2), (3, 1), -1) == (2, 1) and add_units(5, 3) == 8


def test_admission_waits_for_a_slot_then_for_blocks():
    p = pool(2)
    waiting = [Seq(reserve=p.units_for(n)) for n in (3, 900, 5)]
    plan = schedule([], waiting, Budget(max_batch=8, free_units=p.capacity, prefill_chunk=8,
                                        prefill_tokens=64))  # fmt: skip
    assert plan.admitted == waiting[:2]  # two slots: the third waits, without an error
    # a pool of KV blocks and SSM slots: (blocks, slots), each must fit
    waiting = [Seq(reserve=(3, 1)), Seq(reserve=(1, 1)), Seq(reserve=(1, 1))]
    plan = schedule([], waiting, Budget(8, (4, 2), 8, 64))
    assert plan.admitted == waiting[:2]  # blocks would fit the third, slots do not
    plan = schedule([], waiting, Budget(8, (3, 5), 8, 64))
    assert plan.admitted == waiting[:1]  # slots would fit the second, blocks do not
