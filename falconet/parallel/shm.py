"""All-reduce and all-gather for the ranks of one machine through shared memory.

gloo carries a collective over TCP, even between two processes on one machine: an
all-reduce of one decode token's 8 KB activation row takes ~1.7 ms on the 2-core dev
machine, and a decode step has two per layer, so at TP=2 half of rank 0's decode time went
to waiting in gloo (benchmarks/bench_tp.py). Here each rank copies its tensor into its
own slot of a shared mapping, raises its sequence number and waits (spinning, then
yielding) until every rank has raised its own; then every rank sums the slots itself, in
rank order, so every rank gets the same bits (as gloo's sum gives every rank the same
value): ~10 us for that row.

- Double-buffered: round s writes slot set s % 2. A rank that reaches round s has seen
  every rank arrive at round s - 1, which each did only after reading round s - 2, the
  last user of the set it now writes; so one wait per round suffices.
- Memory order: a rank's slot copy and its sequence number are separate stores, which
  x86's total store order keeps in order for the readers; `available()` is false on
  other processors (they keep gloo).
- Tensors larger than a slot go in slot-sized rounds.
- The mapping is a file in /dev/shm, mode 0600 (activations are the user's data), its
  pages reserved up front (a full /dev/shm falls back to gloo at start, not SIGBUS
  later), which rank 0 unlinks as soon as every rank has mapped it (the workers map it
  before they meet rank 0): nothing is left behind after the ranks have met.
- A wait gives up when the group is aborted (rank 0's watchdog saw a worker die) or
  after `timeout` seconds, raising TensorParallelError instead of spinning forever.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from falconet.parallel.plan import TensorParallelError

log = logging.getLogger("falconet.parallel")

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 4 << 20  # per rank and buffer: a 2048-token prefill of an 8192-wide model
LINE = 64  # bytes: each rank's sequence number on its own cache line
SPINS = 2000  # checks of the other ranks before each yield of the CPU


def available() -> bool:
    """Shared-memory collectives can run here: Linux's /dev/shm on an x86 processor, and
    not turned off (FALCONET_TP_SHM=0 keeps gloo, e.g. to compare the two)."""
    if os.environ.get("FALCONET_TP_SHM", "1") == "0":
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


class SharedMemoryGroup:
    """One rank's view of the group's mapping. Rank 0 creates it (`create`), the others
    attach by path (`attach`); rank 0 calls `unlink` once all have attached."""

    def __init__(self, path: Path, rank: int, world: int, fd: int, timeout: float = 120.0):
        self.path, self.rank, self.world, self.timeout = path, rank, world, timeout
        size = _size(world)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        head = (world + 1) * LINE // 8
        words = np.frombuffer(self._map, dtype=np.int64, count=head)
        self._seq_words = words[: world * LINE // 8].reshape(world, LINE // 8)[:, 0]
        self._abort_word = words[world * LINE // 8 :][:1]
        data = torch.frombuffer(self._map, dtype=torch.uint8)[(world + 1) * LINE :]
        # [buffer][rank]: each rank's slot in each half of the double buffer
        self._slots = data.view(2, world, SLOT_BYTES).unbind(0)
        self._seq = int(self._seq_words[rank])

    @classmethod
    def create(cls, world: int, timeout: float = 120.0) -> SharedMemoryGroup | None:
        """Rank 0's group, or None where /dev/shm cannot hold it (read-only, full, a
        container's small default): the ranks then meet through gloo."""
        try:
            fd, name = tempfile.mkstemp(prefix="falconet-tp-", dir=SHM_DIR)  # mode 0600
        except OSError as e:
            log.warning("tensor parallelism: no shared memory (%s); the ranks use gloo", e)
            return None
        try:
            # the pages reserved now: tmpfs would otherwise hand them out on first touch,
            # and a full /dev/shm would kill the ranks (SIGBUS) in the middle of a step
            os.posix_fallocate(fd, 0, _size(world))  # zero-filled: sequence numbers 0
        except OSError as e:
            os.close(fd)
            os.unlink(name)
            log.warning("tensor parallelism: %s cannot hold %d MB (%s); the ranks use gloo",
                        SHM_DIR, _size(world) >> 20, e)  # fmt: skip
            return None
        return cls(Path(name), 0, world, fd, timeout)

    @classmethod
    def attach(cls, path: str | Path, rank: int, world: int) -> SharedMemoryGroup:
        return cls(Path(path), rank, world, os.open(path, os.O_RDWR))

    def unlink(self) -> None:
        """Remove the file (every rank has mapped it: the mappings live on)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def abort(self) -> None:
        """Make every rank's current and future waits fail (a rank died)."""
        self._abort_word[0] = 1

    # ---- the collectives ----------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        """t (contiguous, CPU) <- the sum over ranks of t, in rank order."""
        flat = t.view(-1)
        per = SLOT_BYTES // t.element_size()
        for start in range(0, flat.numel(), per):
            part = flat[start : start + per]
            slots = self._round(part)
            torch.add(slots[0], slots[1], out=part)
            for slot in slots[2:]:
                part.add_(slot)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (all of one shape and dtype), in rank order."""
        flat = t.reshape(-1)
        per = SLOT_BYTES // t.element_size()
        out = [torch.empty_like(flat) for _ in range(self.world)]
        for start in range(0, flat.numel(), per):
            slots = self._round(flat[start : start + per])
            for dst, src in zip(out, slots, strict=True):
                dst[start : start + src.numel()] = src
        return [x.view(t.shape) for x in out]

    # ---- one round ----------------------------------------------------------------------
    def _round(self, part: torch.Tensor) -> list[torch.Tensor]:
        """Publish `part` (at most a slot) and wait for the other ranks' of this round;
        returns views of every rank's slot (valid until the round after next)."""
        self._seq += 1
        nbytes = part.numel() * part.element_size()
        slots = [slot[:nbytes].view(part.dtype) for slot in self._slots[self._seq % 2]]
        slots[self.rank].copy_(part)
        self._seq_words[self.rank] = self._seq  # after the copy: readers see both in order
        for r in range(self.world):
            if r != self.rank:
                self._wait(r)
        return slots

    def _wait(self, r: int) -> None:
        seq, words = self._seq, self._seq_words
        spins, deadline = 0, None
        while words[r] < seq:
            spins += 1
            if spins % SPINS:
                continue
            if self._abort_word[0]:
                raise TensorParallelError(
                    f"rank {self.rank}: the tensor-parallel group was aborted"
                )
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            if now > deadline:
                raise TensorParallelError(
                    f"rank {self.rank}: rank {r} did not reach collective {seq} in "
                    f"{self.timeout:g} s"
                )
            os.sched_yield()


def _size(world: int) -> int:
    return (world + 1) * LINE + 2 * world * SLOT_BYTES
