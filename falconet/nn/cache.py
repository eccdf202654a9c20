"""Static KV cache for a batch of sequences, stored at the model's real KV-head count.

Falcon-7B keeps 1 K and 1 V head per layer instead of 71 (2·64 values per token per
layer rather than 9,088); 40B keeps 8 instead of 128. transformers broadcasts K/V to
every query head before caching, so its cache is as large as an MHA model's.

The buffers are allocated once for the longest sequence the batch may reach, so a
decode step never reallocates (and could be compiled). Rows of different lengths are
left-padded: `key_valid` marks the real tokens, `next_position` counts them per row.
"""

from __future__ import annotations

from typing import Protocol

import torch

from falconet.errors import GenerationError
from falconet.nn.attention import AttentionMask, attend


class CacheConfig(Protocol):
    """What a KV cache reads from a model's config."""

    num_hidden_layers: int
    kv_heads: int
    head_dim: int


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the cache may take: free accelerator memory, or MemAvailable on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class KVCache:
    def __init__(
        self,
        config: CacheConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        need = 2 * torch.Size(shape).numel() * dtype.itemsize
        available = available_memory(device)
        if available is not None and need > available:
            raise GenerationError(
                f"the KV cache for {batch_size} x {max_len} tokens needs {need / 2**30:.1f} GiB but only "
                f"{available / 2**30:.1f} GiB is free; ask for fewer tokens (max_tokens) or a shorter prompt"
            )
        # empty, not zeros: a slot is always written before it is read, and untouched
        # pages of a large cache cost no memory.
        self.k = torch.empty(shape, dtype=dtype, device=device)  # (L, B, K, S_max, D)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.key_positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled (the same for every row)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, valid: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Claim slots for T new tokens; valid (B, T) is False for padding.

        Returns the new tokens' positions (B, T) and the number of slots filled before.
        """
        B, T = valid.shape
        past = self.length
        if past + T > self.max_len:
            raise GenerationError(
                f"KV cache holds {self.max_len} tokens; {past} used and {T} more requested"
            )
        positions = self.next_position[:, None] + valid.long().cumsum(-1) - 1
        positions = positions.clamp(min=0) * valid
        self.key_valid[:, past : past + T] = valid
        self.key_positions[:, past : past + T] = positions
        self.next_position += valid.long().sum(-1)
        self.length = past + T
        return positions, past

    def update(
        self, layer: int, past: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, K, T, D) at slots [past, past+T); return all keys/values so far."""
        end = past + k.shape[2]
        self.k[layer, :, :, past:end] = k
        self.v[layer, :, :, past:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only `rows` of the batch (sequences that finished are dropped)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.key_valid = self.key_valid.index_select(0, rows)
        self.key_positions = self.key_positions.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)


class DenseStep:
    """A left-padded batch: new k/v go into the static KVCache (if any) at slot `past`,
    and every layer attends under the same mask (an `attention.AttentionStep`)."""

    def __init__(self, mask: AttentionMask, cache: KVCache | None, past: int) -> None:
        self.mask, self.cache, self.past = mask, cache, past

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if self.cache is not None:
            k, v = self.cache.update(layer, self.past, k, v)  # (B, K, S, D)
        return attend(q, k, v, self.mask)  # (B, H, T, D)
