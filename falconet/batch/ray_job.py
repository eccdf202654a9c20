"""A batch job on a Ray cluster (`falconet batch run --ray ADDRESS`): the same records,
ledger and output files as `BatchJob`, scored by a pool of Ray actors, each holding one
model and one engine.

    driver   (this process; loads no model) intake: every input line into the ledger, as
             `BatchJob` admits it; then the pending rows, a chunk at a time, as a Ray
             Dataset through `map_batches(ScoringWorker)`; while results come back it
             appends the finished rows to the output files (only this process writes them)
    worker   (a Ray actor: one per `workers`) loads the model once; for each batch of rows
             runs them through its engine with continuous batching and `finish`es their
             outcomes in the ledger, in one transaction, before returning

Exactly-once rests on the ledger, as in a local run: `finish` changes a row only from
pending, so when Ray reruns a batch (an actor killed mid-batch is restarted and its task
retried, or the batch had committed just before the kill) the row keeps its first result.
A task Ray gives up on fails the job with a BatchError; what was committed stays, and the
same command run again scores the rest. The output files are written in seq order from
committed rows only (outputs.py).

The ledger must be reachable by every worker: a PostgreSQL ledger (`--ledger
postgresql://...`) serves a cluster of many machines. An SQLite ledger is a file, shared
safely only by processes of one machine (WAL mode and a busy timeout: one writer at a
time); it is accepted only when every node of the cluster is this machine, and refused
otherwise with a BatchError saying so. The model path must name the same checkpoint on
every node.

A record's prompt is made (and an over-long one rejected) by the worker that scores it,
with the same reject line at the same seq as a local run makes at intake, so the output
files equal a local run's byte for byte at temperature 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from falconet.batch.job import BatchProgress, BatchSettings, Intake, job_identity
from falconet.batch.ledger import Ledger, Pending
from falconet.batch.ledgers import open_ledger
from falconet.batch.outputs import OutputFiles
from falconet.errors import BatchError

CHUNK_ROWS = 100_000  # pending rows per Ray Dataset: the driver holds one chunk at a time


class ScoringWorker:
    """A Ray Data actor: one model and one engine for its lifetime; `__call__` scores a
    batch of ledger rows and commits their outcomes."""

    def __init__(
        self, model: str | None, settings: BatchSettings, ledger: str, load: dict[str, Any]
    ) -> None:
        import falconet
        from falconet.batch.scoring import Scorer

        self.scorer = Scorer(falconet.load(model, **load), settings)
        self.ledger = open_ledger(ledger)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [
            Pending(int(seq), str(key), str(source), str(record))
            for seq, key, source, record in zip(
                batch["seq"], batch["key"], batch["source"], batch["record"], strict=True
            )
        ]
        outcomes = self.scorer.score(rows)
        changed = self.ledger.finish(outcomes)
        return {
            "seq": [o.seq for o in outcomes],
            "state": [o.state for o in outcomes],
            "worker": [os.getpid()] * len(outcomes),
            "changed": [changed] * len(outcomes),  # 0 for a batch Ray ran twice
        }


def model_identity(model: str | None) -> str:
    """What `job_identity` calls the model: the path `falconet.load` reads."""
    from falconet.llm import default_model_path

    return str(default_model_path() if model is None else Path(model).expanduser())


class RayBatchJob:
    """One run of a job on the Ray cluster at `address` with `workers` actors."""

    def __init__(
        self,
        settings: BatchSettings,
        address: str,
        model: str | None = None,
        workers: int = 2,
        load: dict[str, Any] | None = None,
        rows_per_task: int | None = None,
    ) -> None:
        settings.check()
        if settings.follow:
            raise BatchError("--follow is not supported with --ray yet; run it without --ray")
        if workers < 1:
            raise BatchError(f"--ray-workers must be at least 1, got {workers}")
        try:
            import ray
        except ImportError as e:
            raise BatchError(f"--ray needs Ray Data: pip install 'falconet[ray]' ({e})") from None
        self.settings, self.model, self.workers = settings, model, workers
        self.load = load or {}
        # A batch per actor task: several engine windows, so the engine stays full, and
        # small enough that a killed worker loses little.
        self.rows_per_task = rows_per_task or 4 * settings.max_batch
        self._ray = ray
        ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI draws one
        try:
            # WARNING: Ray's own INFO lines ("Connecting to existing Ray cluster...") would
            # otherwise share stderr with the progress bar and a one-line error
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True,
                     logging_level=logging.WARNING)  # fmt: skip
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise BatchError(f"cannot connect to the Ray cluster at {address}: {e}") from None
        self.ledger: Ledger = open_ledger(settings.ledger_location)
        try:
            self._check_ledger_reach()
            self.ledger.claim_job(job_identity(settings, model_identity(model)))
            self.outputs = OutputFiles(self.ledger, settings.out, settings.rejects_path)
            self.intake = Intake(settings, self.ledger)
        except BaseException:
            self.close()
            raise

    def _check_ledger_reach(self) -> None:
        location = self.settings.ledger_location
        if location.startswith(("postgresql://", "postgres://")):
            return
        here = self._ray.util.get_node_ip_address()
        others = sorted({n["NodeManagerAddress"] for n in self._ray.nodes() if n["Alive"]} - {here})
        if others:
            raise BatchError(
                f"the SQLite ledger {location} is a file on this machine, and the Ray "
                f"cluster has nodes on {', '.join(others)} that cannot share it; give a "
                "PostgreSQL ledger every worker can reach: --ledger postgresql://..."
            )

    def progress(self, total: int | None = None) -> BatchProgress:
        return self.intake.progress(total)

    def run(
        self,
        report: Callable[[BatchProgress], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> BatchProgress:
        """Run until every record is finished and written, or `should_stop()`; returns the
        ledger's counts (rows a stopped run had in flight stay pending)."""
        report = report or (lambda progress: None)
        self.outputs.flush()
        report(self.progress())
        while not should_stop() and self.intake():
            pass
        start = self.progress()
        report(start)
        self._score_pending(report, should_stop, start.total)
        self.outputs.flush()
        final = self.progress()
        report(final)
        return final

    def _score_pending(self, report, should_stop, total: int | None) -> None:
        """Score the pending rows, a chunk at a time, writing outputs as batches return."""
        after = 0
        while not should_stop() and (rows := self.ledger.pending(after, CHUNK_ROWS)):
            after = rows[-1].seq
            for _ in self._scored(rows):
                self.outputs.flush()
                report(self.progress(total))
                if should_stop():
                    break

    def _scored(self, rows: list[Pending]):
        """Each batch's summary as the workers finish it."""
        ray = self._ray
        tasks = -(-len(rows) // self.rows_per_task)
        data = ray.data.from_items([asdict(r) for r in rows], override_num_blocks=tasks)
        scored = data.map_batches(
            ScoringWorker,
            fn_constructor_args=(
                self.model,
                self.settings,
                self.settings.ledger_location,
                self.load,
            ),
            batch_size=self.rows_per_task,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1,
        )
        try:
            yield from scored.iter_batches(batch_size=None, batch_format="numpy")
        except BatchError:
            raise
        except Exception as e:  # Ray wraps a worker's error in its own exceptions
            cause = _cause(e)
            if isinstance(cause, BatchError):
                raise BatchError(str(cause)) from None
            raise BatchError(f"the Ray job failed: {_first_line(e)}") from e

    def close(self) -> None:
        self.ledger.close()
        self._ray.shutdown()


def _cause(e: BaseException) -> BaseException:
    """The error a worker raised, under Ray's wrappers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None:
            break
        e = inner
    return e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
