"""The modules that join a rank's shard to the others': one collective each.

Each wraps the module that was loaded (a `Linear`, a `QuantLinear`, an embedding), so
quantization and the row-invariant kernels stay what they are on one process; only the
sums and the gathers across ranks are added here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's input features give a partial sum of the
    whole output; one all-reduce adds the ranks' partial sums, then the bias is added
    once (after the matmul, as Falcon's unfused bias is)."""

    def __init__(self, local: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.local = local
        self.bias = local.bias  # taken off the local matmul: added once, after the sum
        local.bias = None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x).contiguous()
        dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class VocabParallelEmbedding(nn.Module):
    """Token embeddings whose rows [start, stop) live on this rank: each rank looks up the
    ids it owns and gives zeros for the rest; an all-reduce fills in every row (one
    non-zero term per element, so the sum is exact)."""

    def __init__(
        self,
        local: nn.Module,
        start: int,
        stop: int,
        dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.local, self.start, self.stop, self.dtype = local, start, stop, dtype
        self.group = group

    @property
    def weight(self):  # the tied head and weight counting read it
        return self.local.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)  # (B, T)
        x = self.local((ids - self.start) * mine).to(self.dtype)  # (B, T, C)
        x = x.masked_fill(~mine[..., None], 0).contiguous()
        dist.all_reduce(x, group=self.group)
        return x


class GatheredHead(nn.Module):
    """The LM head over this rank's vocabulary rows; the ranks' logit slices are gathered
    into whole (..., V) rows, so every rank samples from the same row."""

    def __init__(
        self, local: nn.Module, vocab_size: int, world: int, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.local, self.vocab_size, self.world = local, vocab_size, world
        self.per_rank = -(-vocab_size // world)  # ceil(V/N): the last rank's slice is padded
        self.group = group

    @property
    def weight(self):
        return self.local.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)  # (..., rows of this rank)
        y = F.pad(y, (0, self.per_rank - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (..., V)
