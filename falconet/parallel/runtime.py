"""A model over N tensor-parallel ranks: rank 0 drives, the other ranks follow its plans.

Rank 0 runs in the caller's process: the engine, the scheduler and whatever face sits on
top (the HTTP server, `LLM`) see one model, `TensorParallelLM`, with the usual
`forward_packed`. Before each packed forward it broadcasts the step -- the token ids,
each sequence's block table, cached length, new length and rope length, the logit rows
-- and every rank runs the same forward on its shard with its own paged KV cache
(its K/N kv heads, the same block ids), meeting at the all-reduces and the logit gather
(layers.py). Ranks 1..N-1 are worker processes started here (torch.multiprocessing,
spawned), or by `torchrun` across nodes; they only ever `follow`.

Failure: rank 0 watches its workers; a worker that exits takes the model down --
`on_failure(message)` is called with a message naming the rank (the CLI prints it and
exits non-zero), and every later step raises TensorParallelError. A worker whose rank 0
has gone (its parent changes, or a collective fails) exits. An idle rank 0 sends a
heartbeat every few seconds, so the workers' collective timeout (gloo's, NCCL's) can be
short without an idle server losing them. A forward that raises on rank 0 may leave the
ranks out of step, so it breaks the model instead of being retried.
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from falconet.engine.hybrid import HybridStep
from falconet.engine.paged import PackedStep, PagedKVCache, Segment
from falconet.engine.state import SlotSegment, SlotStep, SSMSlotPool
from falconet.models.base import CausalLM
from falconet.models.registry import ModelConfig
from falconet.nn.linear import batch_invariant
from falconet.parallel.load import check_source, load_shard, source_config
from falconet.parallel.plan import Shard, TensorParallelError
from falconet.parallel.shm import SharedMemoryGroup
from falconet.parallel.shm import available as shm_available

log = logging.getLogger("falconet.parallel")

STOP, STEP, PING, PEAK_RSS, SLOT_STEP, HYBRID_STEP = 0, 1, 2, 3, 4, 5
HEADER = 8  # op, pool serial, blocks, block size, ids, segments, table entries, logit rows
HEARTBEAT_S = 5.0  # an idle rank 0 pings this often
TIMEOUT_S = 120.0  # a collective waiting longer than this fails (gloo / NCCL timeout)
WATCH_S = 0.2  # how often rank 0 looks at its workers


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """This process is one rank of a `torchrun` job (it set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class TensorParallelLM:
    """Rank 0's model: the engine drives it like any CausalLM; each forward is broadcast
    to the other ranks first. Attributes it does not define come from the local shard
    (`local`, set once rank 0's shard is loaded)."""

    def __init__(
        self,
        local: CausalLM | None,
        world: int,
        workers: mp.ProcessContext | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.local, self.world, self.workers = local, world, workers
        self.on_failure = on_failure
        self.shm: SharedMemoryGroup | None = None  # where the ranks meet, if on one machine
        self.failure: str | None = None  # why the ranks can no longer run
        self._closed = False
        self._lock = threading.Lock()  # one broadcast + forward at a time
        self._pool: PagedKVCache | None = None
        self._serial = 0  # bumped when the engine builds a new pool: followers build theirs
        self._last = time.monotonic()
        self._watchdog: threading.Thread | None = None
        if workers is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name="falconet-tp-watchdog", daemon=True
            )
            self._watchdog.start()

    def __getattr__(self, name: str):
        if name == "local":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    @property
    def config(self):
        return self.local.config  # a ShardConfig: the rank's heads, the model's vocabulary

    @property
    def state_pool(self) -> str:
        """The engine pool the model's class asks for (paged KV, or SSM slots)."""
        return self.local.state_pool

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.local.compute_dtype

    # ---- what the engine calls ----------------------------------------------------------
    def forward_packed(
        self, input_ids: torch.Tensor, step: PackedStep | SlotStep, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        with self._lock:
            self._check()
            pool = step.pool if isinstance(step, SlotStep) else _attention(step).cache
            if pool is not self._pool:
                self._pool, self._serial = pool, self._serial + 1
            header, payload = encode_step(self._serial, input_ids, step, logit_rows)
            try:
                _send(header, payload, self.device)
                logits = self.local.forward_packed(input_ids, step, logit_rows)
            except Exception as e:
                self._fail(f"a tensor-parallel step failed on rank 0: {type(e).__name__}: {e}")
                raise TensorParallelError(self.failure) from e
            self._last = time.monotonic()
            return logits

    # ---- life cycle ---------------------------------------------------------------------
    def wait_ready(self) -> None:
        """Wait until every rank has loaded its shard (raises if a worker fails first),
        then start the heartbeat."""
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            self._check()
            time.sleep(0.02)
        work.wait()
        threading.Thread(target=self._heartbeat, name="falconet-tp-heartbeat", daemon=True).start()

    def peak_rss(self) -> list[int]:
        """Every rank's peak resident bytes so far, each measured in the rank's own
        process (getrusage)."""
        with self._lock:
            self._check()
            _send(_header(PEAK_RSS), None, self.device)
            return _gather_peak_rss(self.device)

    def close(self) -> None:
        """Stop the workers and leave the process group. The model cannot run after."""
        atexit.unregister(self.close)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.failure is None:
                try:
                    _send(_header(STOP), None, self.device)
                except Exception as e:  # a worker that went meanwhile: nothing to stop
                    log.warning("stopping the tensor-parallel workers: %s", e)
        if self.shm is not None:
            self.shm.unlink()
        if self.workers is not None:
            # The watchdog is the one thread that joins the process context (two threads
            # joining it race on its sentinels); once it has seen `_closed` it is gone and
            # the processes are joined here one by one.
            if self._watchdog is not None:
                self._watchdog.join(timeout=10 * WATCH_S)
            deadline = time.monotonic() + 30
            for p in self.workers.processes:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _check(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel model was closed")
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def _fail(self, message: str, collective: bool = True) -> None:
        """Break the model; `collective`: a collective failed (maybe a worker died)."""
        if self.failure is not None:
            return
        # a collective that failed because a worker died: name the worker, as the
        # watchdog would a moment later
        dead = collective and [
            f"tensor-parallel rank {i + 1} (pid {p.pid}) died ({_how(p.exitcode)})"
            for i, p in enumerate(self.workers.processes if self.workers is not None else [])
            if p.exitcode is not None
        ]
        if dead:
            message = f"{dead[0]}; {message}"
        self.failure = message
        if self.shm is not None:  # a rank waiting for the dead one gives up
            self.shm.abort()
        log.error("%s", message)
        if self.on_failure is not None:
            self.on_failure(message)

    def _watch(self) -> None:
        """A worker that exits while the model is open takes it down (never a hang)."""
        while not self._closed and self.failure is None:
            try:
                if self.workers.join(timeout=WATCH_S) and not self._closed:
                    self._fail("the tensor-parallel workers exited", collective=False)
            except mp.ProcessExitedException as e:
                if not self._closed:
                    how = _how(e.exit_code)
                    self._fail(
                        f"tensor-parallel rank {e.error_index + 1} (pid {e.error_pid}) died ({how})",
                        collective=False,
                    )
            except mp.ProcessRaisedException as e:
                if not self._closed:
                    last = str(e).strip().splitlines()[-1]
                    self._fail(
                        f"tensor-parallel rank {e.error_index + 1} (pid {e.error_pid}) failed: {last}",
                        collective=False,
                    )

    def _heartbeat(self) -> None:
        while not self._closed and self.failure is None:
            time.sleep(HEARTBEAT_S / 5)
            if time.monotonic() - self._last < HEARTBEAT_S:
                continue
            with self._lock:
                if self._closed or self.failure is not None:
                    return
                try:
                    _send(_header(PING), None, self.device)
                except Exception as e:
                    self._fail(f"the tensor-parallel workers stopped answering: {e}")
                    return
                self._last = time.monotonic()


# ---- the wire: one header, one payload per step ----------------------------------------
SEGMENT_FIELDS = 5  # past, length, rope_len, as_decode, table length


def _header(op: int, *fields: int) -> torch.Tensor:
    return torch.tensor([op, *fields, *[0] * (HEADER - 1 - len(fields))], dtype=torch.long)


def encode_step(
    serial: int, ids: torch.Tensor, step: PackedStep | SlotStep, logit_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed step as two int64 tensors: what a follower needs to run the same forward.
    A hybrid step (Falcon-H1) is its attention step's, with each sequence's slot after
    (the slot pool's size first)."""
    if isinstance(step, HybridStep):
        header, payload = encode_step(serial, ids, step.attention, logit_rows)
        header[0] = HYBRID_STEP
        slots = [step.slots.pool.num_slots, *[s.slot for s in step.slots.segments]]
        return header, torch.cat([payload, torch.tensor(slots, dtype=torch.long)])
    segs = step.segments
    if isinstance(step, SlotStep):  # a recurrent model's: each sequence's slot and rows
        info = [v for s in segs for v in (s.slot, s.start, s.length, s.past)]
        header = _header(
            SLOT_STEP, serial, step.pool.num_slots, ids.numel(), len(segs), logit_rows.numel()
        )
        payload = torch.cat(
            [ids.cpu().long(), torch.tensor(info, dtype=torch.long), logit_rows.cpu().long()]
        )
        return header, payload
    tables = [b for s in segs for b in s.table]
    info = [v for s in segs for v in (s.past, s.length, s.rope_len, int(s.as_decode), len(s.table))]
    cache = step.cache
    header = _header(
        STEP, serial, cache.num_blocks, cache.block_size,
        ids.numel(), len(segs), len(tables), logit_rows.numel(),
    )  # fmt: skip
    payload = torch.cat(
        [ids.cpu().long(), torch.tensor(info + tables, dtype=torch.long), logit_rows.cpu().long()]
    )
    return header, payload


def _send(header: torch.Tensor, payload: torch.Tensor | None, device: torch.device) -> None:
    dist.broadcast(header.to(device), src=0)
    if payload is not None:
        dist.broadcast(payload.to(device), src=0)


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM, the high-water mark of
    this process's own memory. (getrusage's ru_maxrss also counts, across exec, the
    parent's memory at fork time: a spawned worker would report at least its parent's.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _gather_peak_rss(device: torch.device) -> list[int]:
    mine = torch.tensor([peak_resident_bytes()], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t[0]) for t in out]


def follow(local: CausalLM) -> None:
    """Ranks 1..N-1: run every step rank 0 broadcasts, until it says stop."""
    device = local.device
    pool, ssm_pool, serial = None, None, -1
    with torch.inference_mode(), batch_invariant():
        while True:
            header = torch.empty(HEADER, dtype=torch.long, device=device)
            dist.broadcast(header, src=0)
            op, new_serial, blocks, block_size, n_ids, n_segs, n_tables, n_rows = header.tolist()
            if op == STOP:
                return
            if op == PING:
                continue
            if op == PEAK_RSS:
                _gather_peak_rss(device)
                continue
            if op == SLOT_STEP:
                pool, serial = _follow_slot_step(local, header, pool, serial)
                continue
            hybrid = op == HYBRID_STEP  # then each sequence's slot follows, after the pool's size
            payload = torch.empty(n_ids + SEGMENT_FIELDS * n_segs + n_tables + n_rows
                                  + (1 + n_segs) * hybrid, dtype=torch.long, device=device)  # fmt: skip
            dist.broadcast(payload, src=0)
            if hybrid:
                payload, slots = payload.split([payload.numel() - 1 - n_segs, 1 + n_segs])
                slots = slots.tolist()
            if new_serial != serial:  # the engine built a new pool: so do we (same blocks)
                pool = PagedKVCache(local.config, blocks, block_size, local.compute_dtype, device)
                ssm_pool = SSMSlotPool.for_model(local, slots[0]) if hybrid else None
                serial = new_serial
            ids, info, tables, rows = payload.split(
                [n_ids, SEGMENT_FIELDS * n_segs, n_tables, n_rows]
            )
            info, tables = info.tolist(), tables.tolist()
            segments, at = [], 0
            for i in range(n_segs):
                past, length, rope_len, as_decode, n_table = info[
                    SEGMENT_FIELDS * i : SEGMENT_FIELDS * (i + 1)
                ]
                table = tables[at : at + n_table]
                segments.append(Segment(table, past, length, rope_len, bool(as_decode)))
                at += n_table
            step = PackedStep(pool, segments, local.compute_dtype)
            if hybrid:  # the same sequences' slots (PackedStep set each segment's start)
                step = HybridStep(step, _slot_step(ssm_pool, [
                    SlotSegment(slot, seg.start, seg.length, seg.past)
                    for slot, seg in zip(slots[1:], segments, strict=True)
                ]))  # fmt: skip
            local.forward_packed(ids, step, rows)


def _follow_slot_step(local: CausalLM, header: torch.Tensor, pool, serial: int):
    """One recurrent step on a follower: its own slots (the rank's channels), the same
    slot numbers as rank 0's. Returns (pool, serial)."""
    _, new_serial, slots, n_ids, n_segs, n_rows = header.tolist()[:6]
    payload = torch.empty(n_ids + 4 * n_segs + n_rows, dtype=torch.long, device=local.device)
    dist.broadcast(payload, src=0)
    if new_serial != serial:
        pool, serial = SSMSlotPool.for_model(local, slots), new_serial
    ids, info, rows = payload.split([n_ids, 4 * n_segs, n_rows])
    info = info.tolist()
    segments = [SlotSegment(*info[4 * i : 4 * i + 4]) for i in range(n_segs)]
    local.forward_packed(ids, _slot_step(pool, segments), rows)
    return pool, serial


def _slot_step(pool: SSMSlotPool, segments: list[SlotSegment]) -> SlotStep:
    """A follower's step over its slots; a sequence's first step starts from a zeroed
    slot, as rank 0's pool zeroes it when the sequence takes it."""
    for seg in segments:
        if seg.past == 0:
            pool.conv[:, seg.slot].zero_()
            pool.ssm[:, seg.slot].zero_()
    return SlotStep.of(pool, segments)


def _attention(step: PackedStep | HybridStep) -> PackedStep:
    return step.attention if isinstance(step, HybridStep) else step


# ---- starting the ranks ---------------------------------------------------------------
def start(
    folder: Path,
    config: ModelConfig,
    world: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device,
    quant: str | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> TensorParallelLM:
    """Rank 0 of `world` over `folder` (a Hugging Face checkpoint or a GGUF file): spawns
    ranks 1..world-1 (or joins a `torchrun` job), loads its shard and waits for theirs.
    TensorParallelError for a model that cannot be split, before any worker starts."""
    check_source(folder, config, world, quant)
    if device.type == "cuda" and torch.cuda.device_count() < world and not launched_by_torchrun():
        raise TensorParallelError(
            f"--tp {world} --device cuda needs {world} GPUs; this machine has "
            f"{torch.cuda.device_count()}"
        )
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=TIMEOUT_S)
    if launched_by_torchrun():
        _join_torchrun(world, device, timeout)
        if dist.get_rank() != 0:
            raise TensorParallelError("start() is rank 0's; other ranks call follow_checkpoint()")
        model = TensorParallelLM(None, world, None, on_failure)
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        # the ranks are this machine's processes: on CPUs they meet in shared memory
        shm = (
            SharedMemoryGroup.create(world, TIMEOUT_S)
            if device.type == "cpu" and shm_available()
            else None
        )
        args = (world, init, str(folder), dtype, compute_dtype, device.type, quant, threads,
                shm and str(shm.path))  # fmt: skip
        try:
            workers = mp.start_processes(_worker, args, nprocs=world - 1, join=False,
                                         start_method="spawn")  # fmt: skip
        except BaseException:
            if shm is not None:
                shm.unlink()
            raise
        # watched from here on: a worker that fails to start or to load is reported
        model = TensorParallelLM(None, world, workers, on_failure)
        model.shm = shm
        if device.type == "cuda":
            torch.cuda.set_device(0)
        try:
            _meet(model, backend_for(device), init, world, timeout)
            if model.shm is not None:  # every worker mapped it before meeting us
                model.shm.unlink()
        except Exception as e:
            model.close()
            if isinstance(e, TensorParallelError):
                raise
            raise TensorParallelError(model.failure or f"the ranks did not meet: {e}") from e
    local_device = torch.device("cuda", 0) if device.type == "cuda" else device
    try:
        model.local = _load(folder, config, Shard(0, world), dtype, compute_dtype,
                            local_device, quant, progress, model.shm)  # fmt: skip
        model.wait_ready()
    except BaseException:
        model.close()
        raise
    # before multiprocessing's own exit hook, which would wait for the workers forever
    atexit.register(model.close)
    return model


def _meet(model: TensorParallelLM, backend: str, init: str, world: int, timeout) -> None:
    """Rank 0's rendezvous, given up as soon as the watchdog sees a worker die (it
    would otherwise wait the whole timeout for a rank that never comes)."""
    done, errors = threading.Event(), []

    def run() -> None:
        try:
            dist.init_process_group(backend, init_method=init, rank=0, world_size=world,
                                    timeout=timeout)  # fmt: skip
        except Exception as e:
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="falconet-tp-rendezvous", daemon=True).start()
    while not done.wait(0.05):
        if model.failure is not None:
            raise TensorParallelError(model.failure)
    if errors:
        raise errors[0]


def follow_checkpoint(
    folder: Path,
    world: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device: torch.device,
    quant: str | None = None,
) -> None:
    """A rank other than 0 of a `torchrun` job: load the shard, follow until stopped."""
    config = source_config(folder)
    check_source(folder, config, world, quant)
    _join_torchrun(world, device, timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    local_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    local_device = local_device if device.type == "cuda" else device
    local = _load(folder, config, Shard(rank, world), dtype, compute_dtype, local_device, quant)
    dist.barrier()
    follow(local)
    _leave()


def _join_torchrun(world: int, device: torch.device, timeout: timedelta) -> None:
    if int(os.environ["WORLD_SIZE"]) != world:
        raise TensorParallelError(
            f"--tp {world} but torchrun started {os.environ['WORLD_SIZE']} processes; "
            "give --tp the job's total number of processes"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(device), timeout=timeout)  # env:// from torchrun


def _load(
    folder, config, shard, dtype, compute_dtype, device, quant, progress=None, shm=None
) -> CausalLM:
    model = load_shard(Path(folder), config, shard, dtype, compute_dtype, quant, progress, shm)
    return model.to(device) if device.type != "cpu" else model


def _worker(
    index: int,
    world: int,
    init: str,
    folder: str,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    device_type: str,
    quant: str | None,
    threads: int,
    shm_path: str | None,
) -> None:
    """Rank index + 1, in its own spawned process."""
    rank = index + 1
    _exit_with_parent()
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # mapped before meeting rank 0, which unlinks the file once all have met
    shm = SharedMemoryGroup.attach(shm_path, rank, world) if shm_path else None
    dist.init_process_group(backend_for(device), init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))  # fmt: skip
    config = source_config(Path(folder))
    local = _load(folder, config, Shard(rank, world), dtype, compute_dtype, device, quant, shm=shm)
    dist.barrier()
    follow(local)
    _leave()


def _leave() -> None:
    """A follower told to stop exits at once. It holds nothing to save, and tearing down
    gloo while rank 0 tears down its side can abort the process ("terminate called
    without an active exception"), which torchrun would report as the job's failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_parent() -> None:
    """A worker whose rank 0 died (SIGKILL leaves no time to stop it) exits too."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="falconet-tp-parent", daemon=True).start()


def _how(exitcode: int) -> str:
    if exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
