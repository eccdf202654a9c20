"""A batch job: records in, one prompt each through the engine, results out, exactly once.

The loop keeps the engine full (continuous batching: `window` sequences submitted, the
engine running up to `max_batch` of them at once and admitting the next as one ends):

    intake    read new lines, turn them into records or rejects, `admit` them to the
              ledger with the input's new offset (one transaction per chunk of lines)
    dispatch  submit pending rows, oldest first (after a restart: the rows the killed
              run had in flight), each rendered, tokenized and checked
    collect   read the oldest stream to its end (this drives the engine, which advances
              all of them); its result or reject waits in memory
    commit    every `commit_every` seconds or `max_batch` outcomes: `finish` them in one
              transaction, then append the finished rows to the output files

Bad records never stop the job: each becomes a line of the rejects file with its reason.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from falconet.batch.ledger import Admission, Ledger, Outcome
from falconet.batch.ledgers import open_ledger
from falconet.batch.outputs import OutputFiles
from falconet.batch.prompt import PromptTemplate, TemplateFailed
from falconet.batch.records import (
    Cursor,
    Record,
    Rejected,
    input_files,
    parse,
    read_lines,
    unread_lines,
)
from falconet.batch.scoring import InFlight, Scorer, rejected
from falconet.errors import BatchError
from falconet.sampling import SamplingParams

INTAKE_LINES = 256  # lines per admit transaction


@dataclass(frozen=True)
class BatchSettings:
    """One job, as `falconet batch run` fills it."""

    input: Path
    template: str
    out: Path
    template_name: str = "the prompt template"  # what its errors call it
    params: SamplingParams = SamplingParams(max_tokens=64)
    schema: dict | None = None
    key_field: str | None = None
    follow: bool = False
    ledger: str | None = None  # default: beside `out`
    rejects: Path | None = None  # default: beside `out`
    max_batch: int = 32
    max_record_bytes: int = 1 << 20
    commit_every: float = 0.5  # seconds between commits while records finish
    poll_every: float = 0.2  # seconds between looks at a followed input

    def check(self) -> None:
        """What can be checked without a model (the CLI calls this before loading one):
        the input exists, the template compiles, the limits are sane. Raises BatchError."""
        if self.max_batch < 1:
            raise BatchError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_record_bytes < 1:
            raise BatchError(f"max_record_bytes must be at least 1, got {self.max_record_bytes}")
        input_files(self.input)
        PromptTemplate(self.template, self.template_name)
        if self.ledger and self.ledger.startswith(("postgresql://", "postgres://")):
            from falconet.batch.ledger_postgres import parse_ledger_url

            parse_ledger_url(self.ledger)  # a bad URL or schema name before the load

    @property
    def ledger_location(self) -> str:
        return self.ledger or str(self.out.with_name(self.out.name + ".ledger"))

    @property
    def rejects_path(self) -> Path:
        return self.rejects or self.out.with_name(self.out.stem + ".rejects.jsonl")


@dataclass(frozen=True)
class BatchProgress:
    done: int
    rejected: int
    pending: int
    duplicates: int
    total: int | None  # records known or still to read; None while following an input


def job_identity(settings: BatchSettings, model: str) -> dict[str, Any]:
    """What makes a job's results: a ledger resumes only the job it was made for."""
    params = asdict(replace(settings.params, logits_processors=()))
    del params["logits_processors"]
    return {
        "input": str(settings.input.resolve()),
        "prompt template": hashlib.sha256(settings.template.encode()).hexdigest(),
        "schema": settings.schema,
        "key field": settings.key_field,
        "model": model,
        "sampling": params,
    }


class Intake:
    """Input lines into the ledger: each chunk of up to `limit` lines admitted in one
    transaction with its file's new offset. `check(record)` turns a record into its
    admission (pending, or rejected when it has no usable prompt) and its prompt ids, kept
    in `prompts` for dispatch; without `check` (a driver with no model: ray_job.py) every
    record is admitted pending and the worker that scores it rejects it if need be (the
    same reject line, at the same seq)."""

    def __init__(
        self,
        settings: BatchSettings,
        ledger: Ledger,
        check: Callable[[Record], tuple[Admission, list[int] | None]] | None = None,
    ) -> None:
        self.settings, self.ledger, self.check = settings, ledger, check
        self.files = input_files(settings.input)
        self.cursors = ledger.cursors()
        self.prompts: dict[int, list[int]] = {}  # seq -> prompt ids rendered at intake
        self.exhausted = False  # every input line is in the ledger

    def __call__(self, limit: int = INTAKE_LINES) -> int:
        """Admit up to `limit` new lines; returns how many lines were read."""
        if self.settings.follow and self.settings.input.is_dir():
            self.files = input_files(self.settings.input)
        for name, path in self.files.items():
            start = self.cursors.get(name, Cursor())
            lines = read_lines(
                path, name, start, self.settings.max_record_bytes, self.settings.follow, limit
            )
            if not lines:
                continue
            entries, prompts = [], []
            for line in lines:
                item = parse(line, self.settings.key_field, self.settings.max_record_bytes)
                if isinstance(item, Record):
                    admitted, ids = self._admission(item)
                    entries.append(admitted)
                    prompts.append(ids)
                elif isinstance(item, Rejected):
                    entries.append(rejected(item.key, item.where, item.reason, item.excerpt))
                    prompts.append(None)
            seqs = self.ledger.admit(name, lines[-1].end, entries)
            self.cursors[name] = lines[-1].end
            # Keep the ids for dispatch, so a fresh record is rendered and tokenized once.
            self.prompts.update(
                (seq, ids) for seq, ids in zip(seqs, prompts, strict=True) if seq and ids
            )
            return len(lines)
        self.exhausted = not self.settings.follow
        return 0

    def _admission(self, record: Record) -> tuple[Admission, list[int] | None]:
        if self.check is None:
            return Admission(record.key, record.where, "pending", record=record.text), None
        return self.check(record)

    def progress(self, total: int | None = None) -> BatchProgress:
        """The ledger's counts; `total` as given, or counted now (reading the inputs'
        unread parts) when None and the inputs are not followed."""
        c = self.ledger.counts()
        if total is None and not self.settings.follow:
            total = c["done"] + c["rejected"] + c["pending"]
            total += unread_lines(self.files, self.cursors)
        return BatchProgress(c["done"], c["rejected"], c["pending"], c["duplicates"], total)


class BatchJob:
    """One run of a job over a model; `run()` returns the final counts."""

    def __init__(self, llm, settings: BatchSettings, ledger: Ledger | None = None) -> None:
        settings.check()
        self.llm, self.settings = llm, settings
        self.scorer = Scorer(llm, settings)
        self.template = self.scorer.template
        self.ledger = ledger or open_ledger(settings.ledger_location)
        self.ledger.claim_job(job_identity(settings, str(llm.path)))
        self.outputs = OutputFiles(self.ledger, settings.out, settings.rejects_path)
        self.intake = Intake(settings, self.ledger, self._check)
        self._dispatched = 0  # the last seq submitted

    def _check(self, record: Record) -> tuple[Admission, list[int] | None]:
        try:
            ids = self.scorer.prompt_ids(record.fields)
        except TemplateFailed as e:
            return rejected(record.key, record.where, str(e), record.text), None
        return Admission(record.key, record.where, "pending", record=record.text), ids

    # ---- dispatch -----------------------------------------------------------------------
    def dispatch(self, flight: deque[InFlight], outcomes: list[Outcome]) -> None:
        """Submit pending rows until `window` sequences are in flight."""
        window = 2 * self.settings.max_batch
        while len(flight) < window:
            rows = self.ledger.pending(self._dispatched, window - len(flight))
            if not rows:
                if self.intake.exhausted or not self.intake():
                    return
                continue
            for row in rows:
                self._dispatched = row.seq
                item = self.scorer.submit(row, self.intake.prompts.pop(row.seq, None))
                (outcomes if isinstance(item, Outcome) else flight).append(item)

    # ---- the loop ---------------------------------------------------------------------
    def progress(self, total: int | None = None) -> BatchProgress:
        return self.intake.progress(total)

    def run(
        self,
        report: Callable[[BatchProgress], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> BatchProgress:
        """Run until every record is finished and written (with `follow`: until
        `should_stop()`); returns the ledger's counts. In-flight records of a stopped run
        stay pending for the next."""
        report = report or (lambda progress: None)
        self.outputs.flush()
        start = self.progress()
        report(start)
        flight: deque[InFlight] = deque()
        outcomes: list[Outcome] = []
        last_commit = time.monotonic()
        while not should_stop():
            self.dispatch(flight, outcomes)
            if flight:
                outcome = self.scorer.collect(flight[0], should_stop)
                if outcome is None:
                    break
                flight.popleft()
                outcomes.append(outcome)
            due = time.monotonic() - last_commit >= self.settings.commit_every
            if outcomes and (due or not flight or len(outcomes) >= self.settings.max_batch):
                self._commit(outcomes)
                last_commit = time.monotonic()
                report(self.progress(start.total))
            if not flight and not outcomes:
                if self.intake.exhausted:
                    break
                _sleep(self.settings.poll_every, should_stop)
        for item in flight:  # stopped: these stay pending
            item.stream.cancel()
        self._commit(outcomes)
        final = self.progress()  # a total without the blank lines and duplicates
        report(final)
        return final

    def _commit(self, outcomes: list[Outcome]) -> None:
        if outcomes:
            self.ledger.finish(outcomes)
            outcomes.clear()
        self.outputs.flush()

    def close(self) -> None:
        self.ledger.close()


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not should_stop() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
