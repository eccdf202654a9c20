"""Paged KV cache for continuous batching: one pool of fixed-size blocks shared by all
running sequences, and the packed forward pass that reads and writes it.

Each sequence owns a block table (a list of block ids); token p of a sequence lives in
block `table[p // block_size]` at offset `p % block_size`. Memory follows the actual
lengths: a block is taken from the free list when a sequence grows into it and returned
when the sequence finishes or is cancelled, and the pool is `torch.empty`, so blocks
never used cost no resident memory. K/V are stored at the model's real KV-head count.

With the prefix cache on (prefix.py) a block may be in several block tables at once: it
holds a prompt prefix that later sequences found by its tokens. Blocks are counted by
reference; a cached block that no sequence holds any more stays idle (its K/V kept)
until the free list runs dry, then is evicted least recently used first. `available`
counts both free and idle blocks: what a sequence can still be handed.

A step packs the new tokens of every scheduled sequence into one row (1, N): decode
tokens (one per sequence) and prefill chunks side by side, with no padding. Every
matmul, norm and activation sees those N rows; attention runs per sequence on that
sequence's own cached keys. So what a sequence computes depends only on its own tokens
and its own chunking, never on which other sequences share the step -- with the
row-invariant Linear (falconet.nn.linear.batch_invariant) a sequence's logits are bit for
bit those it gets alone.

Notation as in attention.py: B batch, T new tokens, S keys, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from falconet.engine.prefix import PrefixCache
from falconet.engine.state import PooledSequence, PoolUsage, StepPart
from falconet.errors import GenerationError
from falconet.models.falcon_config import FalconConfig
from falconet.nn.attention import (
    AttentionMask,
    alibi_bias,
    attend,
    build_mask,
    heads_alibi_slopes,
    pooled_decode_applies,
    pooled_decode_attention,
    rotary_cos_sin,
)


class PagedKVCache:
    """The KV block pool: an engine `StatePool` (state.py) whose units are blocks."""

    def __init__(
        self,
        config: FalconConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise GenerationError("a paged KV cache needs at least one block of at least one token")
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Slot-major (token slot = block * block_size + offset) so a sequence's keys are
        # one index_select and new keys one index_copy.
        shape = (
            config.num_hidden_layers,
            num_blocks * block_size,
            config.kv_heads,
            config.head_dim,
        )
        self.k = torch.empty(shape, dtype=dtype, device=device)  # (L, slots, K, D)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # LIFO: a block freed a moment ago is handed out next, while its pages are warm.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # block tables holding each block
        self.prefix: PrefixCache | None = None

    def enable_prefix_cache(self, prefill_chunk: int) -> str | None:
        """Turn the prefix cache on for an engine feeding prompts in chunks of
        `prefill_chunk`; None when on, else why it stays off."""
        if getattr(self.config, "rope_scaling_type", None) == "dynamic":
            # dynamic NTK RoPE rotates a prompt's keys by the whole prompt's length
            return "dynamic RoPE scaling makes a prefix's keys depend on the prompt's length"
        self.prefix = PrefixCache(self.block_size, prefill_chunk)
        return None

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
    ) -> PagedKVCache:
        """A pool for `max_batch` sequences of `max_context` tokens, or `kv_cache_tokens`
        tokens, within `memory_share` of the `available` memory when sized automatically."""
        config = model.config
        tokens = kv_cache_tokens or max_batch * max_context
        per_token = 2 * config.num_hidden_layers * config.kv_heads * config.head_dim
        per_token *= model.compute_dtype.itemsize
        if kv_cache_tokens is None and available is not None:
            tokens = min(tokens, int(available * memory_share) // per_token)
        blocks = -(-tokens // block_size)
        if blocks < -(-max_context // block_size) and kv_cache_tokens is None:
            raise GenerationError(
                f"not enough memory for one sequence of {max_context} tokens "
                f"({per_token * max_context / 2**20:.0f} MiB of KV cache); lower max_context"
            )
        return cls(config, blocks, block_size, model.compute_dtype, model.device)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_blocks

    @property
    def used(self) -> int:
        """Blocks held by sequences (idle cached blocks are not)."""
        return self.num_blocks - self.available

    @property
    def available(self) -> int:
        """Blocks a sequence can be handed now: free, or cached and idle (evictable)."""
        return len(self._free) + (self.prefix.idle if self.prefix is not None else 0)

    def held(self, seq: PooledSequence) -> int:
        return len(seq.table)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def units_for(self, tokens: int) -> int:
        blocks = self.blocks_for(tokens)
        if blocks > self.num_blocks:
            raise GenerationError(
                f"the prompt and max_tokens need {tokens} tokens of KV cache but it holds "
                f"{self.num_blocks * self.block_size}; lower max_tokens"
            )
        return blocks

    def token_bytes(self) -> int:
        """Bytes one cached token takes over all layers (K and V)."""
        return 2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[3] * self.k.element_size()

    def grow(self, seq: PooledSequence, tokens: int) -> None:
        """Extend the sequence's block table in place so it covers `tokens` tokens."""
        table = seq.table
        need = self.blocks_for(tokens) - len(table)
        if need > self.available:
            raise GenerationError(
                f"the KV cache is out of blocks ({need} needed, {self.available} free)"
            )
        for _ in range(need):
            block = self._free.pop() if self._free else self.prefix.evict()
            self._refs[block] = 1
            table.append(block)

    def release(self, seq: PooledSequence) -> None:
        self.trim(seq, 0)

    def trim(self, seq: PooledSequence, tokens: int) -> None:
        """Give back the blocks of `seq` past its first `tokens` tokens: all of them when
        it is done, the blocks only rejected drafts reached after a speculative verify."""
        keep = self.blocks_for(tokens)
        # last block first: LIFO for the free list, and the tail of a cached prefix
        # becomes the least recently used, so it is evicted before the head
        for block in reversed(seq.table[keep:]):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue  # another sequence still reads it
            if self.prefix is not None and self.prefix.holds(block):
                self.prefix.park(block)
            else:
                self._free.append(block)
        del seq.table[keep:]

    # ---- prefix cache -----------------------------------------------------------------
    def lookup(self, seq: PooledSequence) -> tuple[int, int]:
        """(prompt tokens of `seq` found cached, blocks of those held by running
        sequences now, which admitting `seq` costs nothing). No change to the pool."""
        blocks = self._hit(seq)
        return len(blocks) * self.block_size, sum(self._refs[b] > 0 for b in blocks)

    def attach(self, seq: PooledSequence) -> None:
        """Start an admitted sequence from its cached prefix: the blocks go into its table
        (shared, not copied) and its prefill starts after them."""
        if self.prefix is None or seq.keeps_prompt_rows:
            return
        blocks = self._hit(seq)
        for block in blocks:
            if self._refs[block] == 0:
                self.prefix.unpark(block)
            self._refs[block] += 1
        seq.table[:] = blocks
        seq.indexed = len(blocks)  # found by their keys: indexed already
        seq.cached = len(blocks) * self.block_size
        self.prefix.query_tokens += seq.prompt_len
        self.prefix.hit_tokens += seq.cached

    def commit(self, seq: PooledSequence) -> None:
        """Index the cacheable blocks `seq` has computed so far (after a forward)."""
        if self.prefix is None:
            return
        keys = self._keys(seq)
        done = min(len(keys), seq.cached // self.block_size)
        for i in range(seq.indexed, done):
            self.prefix.insert(keys[i], seq.table[i])
        seq.indexed = max(seq.indexed, done)

    def _keys(self, seq: PooledSequence) -> list[bytes]:
        if seq.block_keys is None:  # once per sequence: its prompt never changes
            seq.block_keys = self.prefix.keys(seq.prompt, seq.adapter)
        return seq.block_keys

    def _hit(self, seq: PooledSequence) -> list[int]:
        # a sequence that wants every prompt position's logits must compute them all
        if self.prefix is None or seq.keeps_prompt_rows:
            return []
        return self.prefix.match(self._keys(seq), seq.prompt_len)

    def packed_step(self, parts: list[StepPart], dtype: torch.dtype) -> PackedStep:
        segments = [Segment(p.seq.table, p.past, p.length, p.rope_len, p.as_decode) for p in parts]
        return PackedStep(self, segments, dtype)

    def snapshot(self, seqs: list[PooledSequence]) -> None:
        return None  # a retried forward writes the same K/V at the same new positions

    def restore(self, snapshot: None) -> None:
        pass

    def usage(self) -> PoolUsage:
        if self.prefix is None:
            return PoolUsage(kv_blocks_used=self.used, kv_blocks_total=self.num_blocks)
        return PoolUsage(
            kv_blocks_used=self.used,
            kv_blocks_total=self.num_blocks,
            prefix_cache=True,
            prefix_cached_blocks=self.prefix.blocks,
            prefix_query_tokens=self.prefix.query_tokens,
            prefix_hit_tokens=self.prefix.hit_tokens,
        )

    def slots(self, table: list[int], start: int, stop: int) -> torch.Tensor:
        """Slot indices of token positions [start, stop) of a sequence."""
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.k.device)


@dataclass
class Segment:
    """One sequence's share of a packed step: `length` new tokens after `past` cached ones."""

    table: list[int]  # the sequence's block table (already grown to past + length)
    past: int
    length: int
    rope_len: int  # sequence length for dynamic RoPE scaling (the whole prompt while prefilling)
    as_decode: bool = False  # attend one query at a time (a speculative verify, StepPart)
    start: int = 0  # offset of the new tokens in the packed row
    new_slots: torch.Tensor = field(default=None, repr=False)  # (T,)
    all_slots: torch.Tensor = field(default=None, repr=False)  # (S,)
    mask: AttentionMask = field(default=None, repr=False)


class PackedStep:
    """The attention context of one packed forward: writes each sequence's new K/V into
    its blocks and attends each sequence to its own keys. Built once per step and
    shared by every layer."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], dtype: torch.dtype) -> None:
        config = cache.config
        self.cache = cache
        self.segments = segments
        device = cache.k.device
        slopes = heads_alibi_slopes(config)
        # Decode tokens (one new token after cached ones) attend through the compiled
        # kernel, which reads their keys in the pool: no gather, no mask. A speculative
        # verify's tokens each attend as the decode step they stand for (same bits).
        fast = pooled_decode_applies(cache.k)
        cos, sin, offset = [], [], 0
        rows, slots, lengths = [], [], []  # the decode rows: packed index, keys, key count
        for seg in segments:
            seg.start, offset = offset, offset + seg.length
            seg.new_slots = cache.slots(seg.table, seg.past, seg.past + seg.length)
            seg.all_slots = cache.slots(seg.table, 0, seg.past + seg.length)
            if fast and seg.past > 0 and (seg.length == 1 or seg.as_decode):
                for i in range(seg.length):
                    S = seg.past + i + 1
                    rows.append(seg.start + i)
                    slots.append(seg.all_slots[:S])
                    lengths.append(S)
            else:
                seg.mask = _segment_mask(seg, config, slopes, dtype, device)
            if not config.alibi:
                positions = torch.arange(seg.past, seg.past + seg.length, device=device)[None]
                c, s = rotary_cos_sin(config, positions, torch.tensor([seg.rope_len]), dtype)
                cos.append(c)
                sin.append(s)
        self.tokens = offset
        # (1, 1, N, D) each; per segment so dynamic scaling follows each sequence's length
        self.rope = (torch.cat(cos, dim=2), torch.cat(sin, dim=2)) if cos else None
        # every new token's slot, in packed order: one write per layer for the whole step
        self.new_slots = torch.cat([seg.new_slots for seg in segments])
        self.decode = len(rows)
        self.others = [seg for seg in segments if seg.mask is not None]
        if rows:
            self.decode_rows = torch.tensor(rows)
            self.decode_slots = torch.cat(slots)
            self.decode_starts = torch.tensor([0] + lengths).cumsum(0)
            self.decode_bias = None
            if slopes is not None:  # the mask path's ALiBi bias, by key position
                positions = torch.arange(max(lengths), device=device)[None]
                self.decode_bias = alibi_bias(slopes, positions, config.head_dim, dtype)[0, :, 0]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, K, N, D) for the packed new tokens -> (1, H, N, D)."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]  # (slots, K, D)
        k_pool.index_copy_(0, self.new_slots, k[0].transpose(0, 1))  # (N, K, D)
        v_pool.index_copy_(0, self.new_slots, v[0].transpose(0, 1))
        if not self.others:  # decode only (the common step): every packed row is a decode row
            out = self._decode(q, k_pool, v_pool)
            return out.transpose(0, 1)[None]
        outs = []
        for seg in self.others:
            new = slice(seg.start, seg.start + seg.length)
            if seg.past == 0:  # nothing cached before: the new keys are all the keys
                keys, values = k[:, :, new], v[:, :, new]
            else:
                keys = k_pool.index_select(0, seg.all_slots).transpose(0, 1)[None]  # (1, K, S, D)
                values = v_pool.index_select(0, seg.all_slots).transpose(0, 1)[None]
            if seg.as_decode:
                outs += _attend_as_decode(q[:, :, new], keys, values, seg)
            else:
                outs.append(attend(q[:, :, new], keys, values, seg.mask))
        if not self.decode:
            return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        out = torch.empty_like(q)
        out[0, :, self.decode_rows] = self._decode(q, k_pool, v_pool).transpose(0, 1)
        for seg, o in zip(self.others, _per_segment(outs, self.others), strict=True):
            out[:, :, seg.start : seg.start + seg.length] = o
        return out

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """The decode rows' attention, (B, H, D), B = self.decode."""
        rows = q[0].transpose(0, 1)  # (N, H, D)
        if self.decode != rows.shape[0]:
            rows = rows[self.decode_rows]
        return pooled_decode_attention(
            rows, k_pool, v_pool, self.decode_slots, self.decode_starts, self.decode_bias
        )


def _per_segment(outs: list[torch.Tensor], segments: list[Segment]) -> list[torch.Tensor]:
    """`outs` regrouped one tensor per segment (a verify attended as decode gives one
    tensor per token)."""
    if len(outs) == len(segments):
        return outs
    return list(torch.cat(outs, dim=2).split([seg.length for seg in segments], dim=2))


def _attend_as_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg: Segment
) -> list[torch.Tensor]:
    """Each of the T new queries attends alone to its S' = past + i + 1 keys: the
    shapes (and so the bits) of the decode step it verifies. One SDPA over all T with a
    causal mask sums in another order, which could flip a greedy argmax."""
    outs = []
    for i in range(seg.length):
        S = seg.past + i + 1
        mask = AttentionMask(None)  # a decode step's: no mask but for ALiBi's bias
        if seg.mask.mask is not None and seg.mask.mask.is_floating_point():
            mask = AttentionMask(seg.mask.mask[:, :, i : i + 1, :S].contiguous())
        outs.append(attend(q[:, :, i : i + 1], keys[:, :, :S], values[:, :, :S], mask))
    return outs


def _segment_mask(
    seg: Segment,
    config: FalconConfig,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionMask:
    """A sequence alone, no padding: causal over its own keys (plus ALiBi)."""
    S = seg.past + seg.length
    query_positions = torch.arange(seg.past, S, device=device)[None]  # (1, T)
    key_valid = torch.ones(1, S, dtype=torch.bool, device=device)
    key_positions = torch.arange(S, device=device)[None]  # (1, S)
    return build_mask(query_positions, key_valid, key_positions, seg.past, config, slopes, dtype)
