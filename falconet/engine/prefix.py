"""Automatic prefix caching: KV blocks that hold a prompt prefix are found again by the
tokens they hold, and shared by later sequences with the same prefix instead of being
recomputed (chat and RAG resend the same system prompt or passages every turn).

Key. A full block is keyed by a SHA-256 chained over its tokens and every token before
it (`key_i = sha256(key_{i-1} || tokens of block i)`), so equal keys mean equal tokens
from position 0 on, and K/V at a position depend only on those tokens. A 256-bit digest
makes a false match far less likely than a hardware fault; Python's 64-bit `hash` would
not.

Bit-identical results. K/V at a position are the same numbers whichever sequence
computed them only if the forwards that computed them were the same: the engine feeds a
prompt in chunks at multiples of `prefill_chunk` from its start (scheduler.py), and
attention over T queries and S keys is not promised to give a row the same bits for
another T or S. So:

- a block is cached only if it lies inside a *full* prefill chunk of the prompt that
  computed it (every sequence computes such a chunk the same way; the last, shorter
  chunk and generated tokens depend on the prompt's length and are not cached);
- a hit ends on a multiple of lcm(block_size, prefill_chunk), so the rest of the prompt
  is fed in exactly the chunks it would have been fed without the cache, and the last
  prompt token is always computed (its logits give the first token).

With the defaults (blocks of 16, chunks of 128) a hit is a multiple of 128 tokens.

Memory. A cached block that no running sequence holds stays in the pool, idle, until
the pool runs out of free blocks; then the least recently released one is evicted (its
key forgotten) and handed out. A sequence's blocks are released last-first, so the tail
of a prefix goes before its head, which every longer hit needs.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict


class PrefixCache:
    """The index of cached blocks: key -> block, and the idle ones in LRU order. The KV
    pool (paged.py) owns the blocks and their reference counts and asks this index."""

    def __init__(self, block_size: int, prefill_chunk: int) -> None:
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.stride = math.lcm(block_size, prefill_chunk)  # hits are multiples of this
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.query_tokens = 0  # prompt tokens of sequences that looked for a prefix
        self.hit_tokens = 0  # of those, tokens found cached (not computed)

    def keys(self, prompt: list[int], adapter: str | None = None) -> list[bytes]:
        """Keys of the prompt's cacheable blocks: the full blocks inside its full
        prefill chunks. A LoRA adapter computes other K/V for the same tokens, so its
        chain starts from a digest of its name (no key of the base chain, nor of another
        adapter's, can equal it short of a SHA-256 collision)."""
        B = self.block_size
        cacheable = len(prompt) // self.prefill_chunk * self.prefill_chunk
        key = b"" if adapter is None else hashlib.sha256(b"lora:" + adapter.encode()).digest()
        keys = []
        for i in range(cacheable // B):
            key = hashlib.sha256(key + array("q", prompt[i * B : (i + 1) * B]).tobytes()).digest()
            keys.append(key)
        return keys

    def match(self, keys: list[bytes], prompt_len: int) -> list[int]:
        """The cached blocks a prompt with these keys may start from: the longest cached
        run of its keys from the start, cut to a multiple of `stride` tokens below
        `prompt_len`."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        tokens = len(blocks) * self.block_size // self.stride * self.stride
        if tokens >= prompt_len:  # the last prompt token is always computed
            tokens -= self.stride
        return blocks[: max(tokens, 0) // self.block_size]

    def insert(self, key: bytes, block: int) -> None:
        """Index a block just computed; a key already cached keeps its block (two
        sequences computed the same prefix at once), and this block stays private."""
        if key not in self._block_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def holds(self, block: int) -> bool:
        return block in self._key_of

    def park(self, block: int) -> None:
        """A cached block no sequence holds any more: idle, evictable."""
        self._idle[block] = None

    def unpark(self, block: int) -> None:
        """An idle cached block a sequence takes again."""
        del self._idle[block]

    def evict(self) -> int:
        """Forget the least recently released idle block and return it for reuse."""
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def blocks(self) -> int:
        """Blocks holding a cached prefix, held by sequences or idle."""
        return len(self._key_of)
