"""Per-sequence model state for the engine: the pools a model's state lives in.

What a running sequence keeps between steps depends on the model: an attention model
keeps K/V per token (`paged.PagedKVCache`, blocks that follow the length), a recurrent
model keeps a fixed-size state whatever the length (`SSMSlotPool`, one slot per
sequence). The engine, the runner and the scheduler speak to either through `StatePool`
and never ask which kind of model they run: the model class names its pool
(`CausalLM.state_pool`, looked up in engine.py's `POOLS`).

A pool counts its memory in units: KV blocks, SSM slots. A sequence is admitted only
when the pool can promise it the units its whole budget (prompt + max_tokens) needs
(`units_for`), so a running sequence is never preempted. Units are an int for a pool of
one kind; a pool holding two kinds at once (hybrid.py's `HybridPool`, Falcon-H1: KV
blocks for its attention and one SSM slot for its Mamba heads) gives a tuple, which the
scheduler compares element-wise (scheduler.fits).

Admission counts what the pool can still hand out (`available`: free units, and for
the KV pool idle cached blocks it may evict) less what running sequences may still take
(their units less what they `held`), so a prefix shared with running sequences costs a
new sequence nothing (prefix.py, `lookup`/`attach`/`commit`; only the KV pool has a
prefix cache).

Retries: the runner retries a failed forward on halves of its batch. A KV pool needs
nothing for that (a forward only writes K/V at new positions, the same values again), but
a recurrent state is advanced in place, so before a forward that may be retried the
runner takes a `snapshot` of the step's sequences' states and `restore`s it before the
retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from falconet.engine.scheduler import Units
from falconet.errors import GenerationError


class PooledSequence(Protocol):
    """What a pool keeps on a sequence: its handles into the pool."""

    table: list[int]  # KV block table
    slot: int | None  # SSM slot
    prompt: list[int]
    cached: int  # tokens in the state
    keeps_prompt_rows: (
        bool  # every prompt position computed (logits, prompt logprobs): no prefix hit
    )
    block_keys: list[bytes] | None  # prefix-cache keys of the prompt's blocks (prefix.py)
    adapter: str | None  # the LoRA adapter it runs with (its prefix keys differ)
    indexed: int  # blocks of its table found in or added to the prefix cache

    @property
    def prompt_len(self) -> int: ...


@dataclass
class StepPart:
    """One sequence's share of a packed step: `length` new tokens after `past` cached."""

    seq: Any  # a PooledSequence
    past: int
    length: int
    rope_len: int  # sequence length for dynamic RoPE scaling (attention pools only)
    # a speculative verify: each new token attends to the keys before it one query at a
    # time, as the decode step it stands for would (attention pools only; speculative.py)
    as_decode: bool = False


@dataclass(frozen=True)
class PoolUsage:
    """What a pool holds now, by kind (for stats and /metrics)."""

    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    ssm_slots_used: int = 0
    ssm_slots_total: int = 0
    prefix_cache: bool = False  # the KV prefix cache is on (prefix.py)
    prefix_cached_blocks: int = 0  # blocks holding a cached prefix (held or idle)
    prefix_query_tokens: int = 0  # prompt tokens of sequences that looked for a prefix
    prefix_hit_tokens: int = 0  # of those, found cached


class StatePool(Protocol):
    """The per-sequence state of every running sequence, for one model."""

    @property
    def capacity(self) -> Units: ...  # units in the pool

    @property
    def used(self) -> Units: ...  # units held by sequences now

    @property
    def available(self) -> Units: ...  # units that can be handed out now

    def held(self, seq: PooledSequence) -> Units:
        """Units `seq` holds now."""
        ...

    def units_for(self, tokens: int) -> Units:
        """Units a sequence of `tokens` tokens holds at most. GenerationError when even
        the whole pool could not hold it."""
        ...

    def grow(self, seq: PooledSequence, tokens: int) -> None:
        """Make `seq`'s state cover `tokens` tokens (take blocks, or its slot)."""
        ...

    def release(self, seq: PooledSequence) -> None:
        """Give back everything `seq` holds (finished or cancelled)."""
        ...

    def trim(self, seq: PooledSequence, tokens: int) -> None:
        """Give back what `seq` holds past its first `tokens` tokens (rejected drafts)."""
        ...

    def packed_step(self, parts: list[StepPart], dtype: torch.dtype) -> Any:
        """The state context `model.forward_packed` reads and writes for these parts."""
        ...

    def snapshot(self, seqs: Sequence[PooledSequence]) -> Any:
        """What `restore` needs to undo a forward over `seqs` (None: nothing to undo)."""
        ...

    def restore(self, snapshot: Any) -> None: ...

    def usage(self) -> PoolUsage: ...

    def enable_prefix_cache(self, prefill_chunk: int) -> str | None:
        """Turn on prefix caching; None when on, else why this pool cannot."""
        ...

    def lookup(self, seq: PooledSequence) -> tuple[int, Units]:
        """(prompt tokens of `seq` the pool holds already, units of those held by
        running sequences now). Changes nothing."""
        ...

    def attach(self, seq: PooledSequence) -> None:
        """Start an admitted `seq` from what `lookup` found (sets its state and cached)."""
        ...

    def commit(self, seq: PooledSequence) -> None:
        """Offer what `seq` has computed so far to later sequences."""
        ...


class SSMSlotPool:
    """Fixed-size recurrent states: `slots` slots, each holding one sequence's conv and
    SSM state for every layer, in the shapes the model's config gives
    (`ssm_state_shapes`): Falcon-Mamba's conv (E, K - 1) and ssm (E, N), Falcon-H1's
    conv (conv_dim, K - 1) and ssm (heads, d_head, N).

    conv (L, slots, *conv_shape) in the compute dtype, ssm (L, slots, *ssm_shape) fp32.
    A sequence takes one slot when it first runs (zeroed: the start of a sequence) and
    gives it back when it finishes or is cancelled; the size never depends on the
    length, so one slot is its whole reservation. `torch.empty`, so slots never used cost
    no resident memory.
    """

    def __init__(
        self,
        layers: int,
        conv_shape: tuple[int, ...],
        ssm_shape: tuple[int, ...],
        slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if slots < 1:
            raise GenerationError("an SSM state pool needs at least one slot")
        self.num_slots = slots
        self.conv = torch.empty(layers, slots, *conv_shape, dtype=dtype, device=device)
        self.ssm = torch.empty(layers, slots, *ssm_shape, dtype=torch.float32, device=device)
        # LIFO, like the KV blocks: a slot freed a moment ago is reused while warm
        self._free = list(range(slots - 1, -1, -1))

    @classmethod
    def for_model(cls, model, slots: int) -> SSMSlotPool:
        c = model.config
        conv, ssm = c.ssm_state_shapes()
        return cls(c.num_hidden_layers, conv, ssm, slots, model.compute_dtype, model.device)

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
    ) -> SSMSlotPool:
        """One slot per batch place: a running sequence always has one. The KV knobs
        (block_size, kv_cache_tokens) do not apply to a recurrent state."""
        per_slot = cls.slot_bytes_for(model)
        if available is not None and per_slot > available * memory_share:
            raise GenerationError(
                f"not enough memory for one sequence's recurrent state ({per_slot / 2**20:.0f} MiB)"
            )
        slots = max_batch
        if available is not None:
            slots = max(1, min(slots, int(available * memory_share) // per_slot))
        return cls.for_model(model, slots)

    @staticmethod
    def slot_bytes_for(model) -> int:
        """Bytes of one sequence's state over all layers (conv + fp32 SSM state)."""
        return model.config.state_bytes_per_sequence(model.compute_dtype.itemsize)

    def slot_bytes(self) -> int:
        conv = self.conv[:, 0].numel() * self.conv.element_size()
        return conv + self.ssm[:, 0].numel() * self.ssm.element_size()

    def usage(self) -> PoolUsage:
        return PoolUsage(ssm_slots_used=self.used, ssm_slots_total=self.num_slots)

    @property
    def capacity(self) -> int:
        return self.num_slots

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def available(self) -> int:
        return len(self._free)

    def held(self, seq: PooledSequence) -> int:
        return int(seq.slot is not None)

    def units_for(self, tokens: int) -> int:
        return 1  # the state does not grow with the length

    def enable_prefix_cache(self, prefill_chunk: int) -> str | None:
        # A recurrent state is one running summary of every token so far: reusing a
        # prefix would need the state checkpointed at its end, which is not kept.
        return "a recurrent (SSM) state is not checkpointed at block boundaries"

    def lookup(self, seq: PooledSequence) -> tuple[int, int]:
        return 0, 0

    def attach(self, seq: PooledSequence) -> None:
        pass

    def commit(self, seq: PooledSequence) -> None:
        pass

    def grow(self, seq: PooledSequence, tokens: int) -> None:
        if seq.slot is not None:
            return
        if not self._free:
            raise GenerationError("the SSM state pool is out of slots")
        seq.slot = self._free.pop()
        self.conv[:, seq.slot].zero_()
        self.ssm[:, seq.slot].zero_()

    def trim(self, seq: PooledSequence, tokens: int) -> None:
        pass  # one slot whatever the length

    def release(self, seq: PooledSequence) -> None:
        if seq.slot is not None:
            self._free.append(seq.slot)
            seq.slot = None

    def packed_step(self, parts: list[StepPart], dtype: torch.dtype) -> SlotStep:
        return SlotStep(self, parts)

    def snapshot(self, seqs: Sequence[PooledSequence]) -> tuple[torch.Tensor, ...]:
        idx = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.conv.device)
        return idx, self.conv.index_select(1, idx), self.ssm.index_select(1, idx)

    def restore(self, snapshot: tuple[torch.Tensor, ...]) -> None:
        idx, conv, ssm = snapshot
        self.conv.index_copy_(1, idx, conv)
        self.ssm.index_copy_(1, idx, ssm)


@dataclass
class SlotSegment:
    """One sequence's rows of a packed step and its slot."""

    slot: int
    start: int  # offset of its new tokens in the packed row
    length: int
    past: int = 0  # tokens it has seen before this step (0: its slot starts zeroed)


class SlotStep:
    """The recurrent context of one packed forward: where each sequence's rows are and
    its state, per layer, as views the model advances in place."""

    def __init__(self, pool: SSMSlotPool, parts: list[StepPart]) -> None:
        self.pool = pool
        self.segments, offset = [], 0
        for p in parts:
            self.segments.append(SlotSegment(p.seq.slot, offset, p.length, p.past))
            offset += p.length
        self.tokens = offset

    @classmethod
    def of(cls, pool: SSMSlotPool, segments: list[SlotSegment]) -> SlotStep:
        """The step of `segments` (a tensor-parallel follower's copy of rank 0's)."""
        step = cls(pool, [])
        step.segments = segments
        step.tokens = sum(s.length for s in segments)
        return step

    def states(self, layer: int) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Per sequence: its rows, conv state (1, *conv_shape) and SSM state
        (1, *ssm_shape) of `layer`, views into the pool."""
        conv, ssm = self.pool.conv[layer], self.pool.ssm[layer]
        return [
            (
                slice(s.start, s.start + s.length),
                conv[s.slot : s.slot + 1],
                ssm[s.slot : s.slot + 1],
            )
            for s in self.segments
        ]
