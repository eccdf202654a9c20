"""parallel/shm.py: the shared-memory all-reduce and all-gather of ranks on one machine,
between real processes: each rank gets the rank-order sum bit for bit, tensors larger
than a slot go in several rounds, the double buffer survives many rounds, a rank waiting
for a dead one gives up (abort, timeout), and the mapping is private and gone once the
ranks have it."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pytest
import torch
import torch.multiprocessing as mp

import falconet
from falconet.parallel import TensorParallelError
from falconet.parallel import shm as shm_module
from falconet.parallel.shm import SLOT_BYTES, SharedMemoryGroup

pytestmark = pytest.mark.skipif(not shm_module.available(), reason="needs /dev/shm on x86")

WORLD = 3  # more than two: the sum of three slots in rank order
ROUNDS = 40  # many rounds: both halves of the double buffer, reused
BIG = (SLOT_BYTES // 4 + 1000,)  # fp32: more than a slot, so two rounds


def rank_tensor(rank: int, shape, dtype, round_: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    return torch.randn(shape, generator=g).to(dtype)


def calls(round_: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    shapes = [(1, 2048), (7, 33)] + ([BIG] if round_ < 3 else [])
    return [(shape, dtype) for shape in shapes for dtype in (torch.float32, torch.bfloat16)]


def _member(rank: int, path: str, out: dict) -> None:
    """Rank `rank`'s collectives; out[rank] = for each result, whether it equals the
    rank-order sum (or the gathered tensors) computed here in one process."""
    group = SharedMemoryGroup.attach(path, rank, WORLD)
    equal = []
    for round_ in range(ROUNDS):
        for shape, dtype in calls(round_):
            t = rank_tensor(rank, shape, dtype, round_)
            group.all_reduce(t)
            parts = [rank_tensor(r, shape, dtype, round_) for r in range(WORLD)]
            want = (parts[0] + parts[1]) + parts[2]  # in rank order, in the dtype
            equal.append(t.dtype == want.dtype and torch.equal(t, want))
        gathered = group.all_gather(rank_tensor(rank, (5, 3), torch.float32, round_))
        want = [rank_tensor(r, (5, 3), torch.float32, round_) for r in range(WORLD)]
        equal.append(len(gathered) == WORLD and all(map(torch.equal, gathered, want)))
    out[rank] = equal


def test_every_rank_gets_the_rank_order_sum_bit_for_bit():
    group = SharedMemoryGroup.create(WORLD)
    try:
        assert stat.S_IMODE(os.stat(group.path).st_mode) == 0o600  # activations are private
        with mp.Manager() as manager:
            out = manager.dict()
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_member, args=(r, str(group.path), out)) for r in (1, 2)]
            for p in procs:
                p.start()
            _member(0, str(group.path), out)
            for p in procs:
                p.join(120)
                assert p.exitcode == 0
            results = dict(out)
    finally:
        group.unlink()
    assert not group.path.exists()
    n = sum(len(calls(r)) + 1 for r in range(ROUNDS))
    for rank in range(WORLD):
        assert len(results[rank]) == n
        assert all(results[rank]), [i for i, ok in enumerate(results[rank]) if not ok]


def test_a_wait_for_a_rank_that_never_comes_gives_up():
    group = SharedMemoryGroup.create(2, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1 did not reach collective 1 in 0.5 s"):
            group.all_reduce(torch.ones(4))
        assert time.monotonic() - started < 5
        other = SharedMemoryGroup.attach(group.path, 1, 2)
        other.abort()  # what rank 0's watchdog does when a worker dies
        with pytest.raises(
            TensorParallelError, match="rank 0: the tensor-parallel group was aborted"
        ):
            group.all_reduce(torch.ones(4))
    finally:
        group.unlink()


def test_tp_model_leaves_no_mapping_and_gloo_still_serves(tmp_path, monkeypatch, tiny_7b):
    """A TP=2 model on CPU meets in shared memory (the file is unlinked once the ranks
    have mapped it); FALCONET_TP_SHM=0 keeps gloo, with the same logits."""
    before = set(os.listdir(shm_module.SHM_DIR))
    ids = list(range(30, 59))
    two = falconet.load(tiny_7b, dtype="float32", tp=2)
    try:
        assert two.model.shm is not None
        assert not two.model.shm.path.exists()
        assert set(os.listdir(shm_module.SHM_DIR)) == before
        via_shm = two.logits(ids)
    finally:
        two.close()
    monkeypatch.setenv("FALCONET_TP_SHM", "0")
    two = falconet.load(tiny_7b, dtype="float32", tp=2)
    try:
        assert two.model.shm is None
        via_gloo = two.logits(ids)
    finally:
        two.close()
    one = falconet.load(tiny_7b, dtype="float32").logits(ids)
    assert (via_shm - one).abs().max().item() <= 1e-5
    assert (via_gloo - one).abs().max().item() <= 1e-5


def test_a_dev_shm_that_cannot_hold_the_group_falls_back_to_gloo(monkeypatch, caplog):
    """tmpfs hands out pages on first touch: a full /dev/shm (a container's 64 MB default)
    would kill the ranks with SIGBUS in the middle of a step. The pages are reserved at
    start instead; when they cannot be, there is no group (the ranks use gloo) and no file."""
    made = []
    mkstemp = shm_module.tempfile.mkstemp

    def recorded(*a, **kw):
        fd, name = mkstemp(*a, **kw)
        made.append(name)
        return fd, name

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm_module.tempfile, "mkstemp", recorded)
    monkeypatch.setattr(shm_module.os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger="falconet.parallel"):
        assert SharedMemoryGroup.create(2) is None
    assert len(made) == 1 and not os.path.exists(made[0])
    assert "cannot hold" in caplog.text and "the ranks use gloo" in caplog.text
