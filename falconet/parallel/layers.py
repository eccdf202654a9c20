"""The modules that join a rank's shard to the others': one collective each.

Each wraps the module that was loaded (a `Linear`, a `QuantLinear`, an embedding), so
quantization and the row-invariant kernels stay what they are on one process; only the
sums and the gathers across ranks are added here. Ranks of one machine on CPUs meet in
shared memory (shm.py, `shm`), the others through torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from falconet.nn.linear import Linear
from falconet.parallel.shm import SharedMemoryGroup


def all_reduce(t: torch.Tensor, group, shm: SharedMemoryGroup | None) -> None:
    """t <- the sum of every rank's t (contiguous)."""
    if shm is not None:
        shm.all_reduce(t)
    else:
        dist.all_reduce(t, group=group)


def all_gather(t: torch.Tensor, world: int, group, shm: SharedMemoryGroup | None):
    """Every rank's t, in rank order."""
    if shm is not None:
        return shm.all_gather(t)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return parts


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's input features give a partial sum of the
    whole output; one all-reduce adds the ranks' partial sums, then the bias is added
    once (after the matmul, as Falcon's unfused bias is)."""

    def __init__(
        self,
        local: nn.Module,
        group: dist.ProcessGroup | None = None,
        shm: SharedMemoryGroup | None = None,
    ) -> None:
        super().__init__()
        self.local = local
        self.bias = local.bias  # taken off the local matmul: added once, after the sum
        local.bias = None
        self.group, self.shm = group, shm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a narrow (bf16/fp16) weight's partial sums stay fp32 until summed over the
        # ranks, then are rounded once, as one process rounds its whole sum
        partial = self.local.unrounded(x) if isinstance(self.local, Linear) else None
        if partial is not None:
            all_reduce(partial, self.group, self.shm)
            y = partial.to(self.local.weight.dtype).to(x.dtype)
        else:
            y = self.local(x).contiguous()
            all_reduce(y, self.group, self.shm)
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
        shm: SharedMemoryGroup | None = None,
    ) -> None:
        super().__init__()
        self.local, self.start, self.stop, self.dtype = local, start, stop, dtype
        self.group, self.shm = group, shm

    @property
    def weight(self):  # the tied head and weight counting read it
        return self.local.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)  # (B, T)
        x = self.local((ids - self.start) * mine).to(self.dtype)  # (B, T, C)
        x = x.masked_fill(~mine[..., None], 0).contiguous()
        all_reduce(x, self.group, self.shm)
        return x


class GatheredHead(nn.Module):
    """The LM head over this rank's vocabulary rows; the ranks' logit slices are gathered
    into whole (..., V) rows, so every rank samples from the same row."""

    def __init__(
        self,
        local: nn.Module,
        vocab_size: int,
        world: int,
        group: dist.ProcessGroup | None = None,
        shm: SharedMemoryGroup | None = None,
    ) -> None:
        super().__init__()
        self.local, self.vocab_size, self.world = local, vocab_size, world
        self.per_rank = -(-vocab_size // world)  # ceil(V/N): the last rank's slice is padded
        self.group, self.shm = group, shm

    @property
    def weight(self):
        return self.local.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)  # (..., rows of this rank)
        y = F.pad(y, (0, self.per_rank - y.shape[-1])).contiguous()
        parts = all_gather(y, self.world, self.group, self.shm)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (..., V)


def summed(t: torch.Tensor, group=None, shm: SharedMemoryGroup | None = None) -> torch.Tensor:
    """The sum of every rank's t (a new contiguous tensor where t was not one)."""
    t = t.contiguous()
    all_reduce(t, group, shm)
    return t
