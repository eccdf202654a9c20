"""The state pool of a hybrid model (Falcon-H1): KV blocks and an SSM slot per sequence.

Falcon-H1 runs attention and Mamba-2 side by side in every layer, so a sequence keeps
both kinds of state: K/V that grow with its length (paged.py's blocks) and a fixed-size
conv + SSM state (state.py's slots). `HybridPool` joins the two pools under the one
`StatePool` interface; its units are `(blocks, slots)` tuples, which the scheduler
admits element-wise, so a sequence waits until both its blocks and a slot are free.

Memory: the slots are sized first (one per batch place, as for Falcon-Mamba), then the
KV blocks take what is left of the pool's share, so a long context costs only the KV it
really needs while every running sequence still has its slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from falconet.engine.paged import PackedStep, PagedKVCache
from falconet.engine.state import PooledSequence, PoolUsage, SlotStep, SSMSlotPool, StepPart


@dataclass
class HybridStep:
    """One packed forward's context: attention over the KV blocks, recurrent states in
    the slots. The model reads `attention` where an attention model reads its step
    (rope, per-layer attend) and `slots.states(layer)` where a recurrent one does."""

    attention: PackedStep
    slots: SlotStep

    @property
    def rope(self):
        return self.attention.rope


class HybridPool:
    """KV blocks + SSM slots: an engine `StatePool` whose units are (blocks, slots)."""

    def __init__(self, kv: PagedKVCache, ssm: SSMSlotPool) -> None:
        self.kv, self.ssm = kv, ssm

    @classmethod
    def for_engine(
        cls,
        model,
        *,
        max_batch: int,
        max_context: int,
        block_size: int,
        kv_cache_tokens: int | None,
        available: int | None,
        memory_share: float,
    ) -> HybridPool:
        knobs = dict(max_batch=max_batch, max_context=max_context, block_size=block_size,
                     kv_cache_tokens=kv_cache_tokens, memory_share=memory_share)  # fmt: skip
        ssm = SSMSlotPool.for_engine(model, available=available, **knobs)
        if available is not None:  # the slots' bytes come out of the same share
            available = max(0, available - int(ssm.num_slots * ssm.slot_bytes() / memory_share))
        return cls(PagedKVCache.for_engine(model, available=available, **knobs), ssm)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.kv.capacity, self.ssm.capacity

    @property
    def used(self) -> tuple[int, int]:
        return self.kv.used, self.ssm.used

    @property
    def available(self) -> tuple[int, int]:
        return self.kv.available, self.ssm.available

    def held(self, seq: PooledSequence) -> tuple[int, int]:
        return self.kv.held(seq), self.ssm.held(seq)

    def enable_prefix_cache(self, prefill_chunk: int) -> str | None:
        # the KV half could be shared, but the Mamba-2 state beside it would have to be
        # checkpointed at the prefix's end: not kept, so the cache stays off
        return self.ssm.enable_prefix_cache(prefill_chunk)

    def lookup(self, seq: PooledSequence) -> tuple[int, tuple[int, int]]:
        return 0, (0, 0)

    def attach(self, seq: PooledSequence) -> None:
        pass

    def commit(self, seq: PooledSequence) -> None:
        pass

    def units_for(self, tokens: int) -> tuple[int, int]:
        return self.kv.units_for(tokens), self.ssm.units_for(tokens)

    def grow(self, seq: PooledSequence, tokens: int) -> None:
        self.kv.grow(seq, tokens)
        self.ssm.grow(seq, tokens)

    def release(self, seq: PooledSequence) -> None:
        self.kv.release(seq)
        self.ssm.release(seq)

    def trim(self, seq: PooledSequence, tokens: int) -> None:
        self.kv.trim(seq, tokens)  # the SSM slot does not follow the length

    def packed_step(self, parts: list[StepPart], dtype: torch.dtype) -> HybridStep:
        return HybridStep(self.kv.packed_step(parts, dtype), self.ssm.packed_step(parts, dtype))

    def snapshot(self, seqs: Sequence[PooledSequence]):
        return self.ssm.snapshot(seqs)  # K/V need none (state.py)

    def restore(self, snapshot) -> None:
        self.ssm.restore(snapshot)

    def token_bytes(self) -> int:
        return self.kv.token_bytes()

    def slot_bytes(self) -> int:
        return self.ssm.slot_bytes()

    def usage(self) -> PoolUsage:
        kv, ssm = self.kv.usage(), self.ssm.usage()
        return PoolUsage(kv.kv_blocks_used, kv.kv_blocks_total, ssm.ssm_slots_used,
                         ssm.ssm_slots_total)  # fmt: skip
