"""The batch ledger: which records a job has taken in, scored and written out.

Exactly-once rests on three facts the ledger keeps, each changed in one transaction:

    records   seq (admission order) · key (unique) · state pending -> done | rejected ·
              the record while pending · the output line once finished
    inputs    per input file, the byte offset and line number read so far
    emitted   the last seq whose line is in the output files, and each file's size then

`admit` inserts a batch of lines' records and moves their file's offset in the same
transaction, so a line is taken in exactly once; a key seen before is a duplicate and is
not inserted again. `finish` turns pending rows done (or rejected) with their output line,
only from pending, so a record is finished once even if two workers scored it. The
output files are written only from finished rows (outputs.py) and `mark_emitted` records
how far, so a killed run loses at most work in flight: its rows are still pending, and
the next run scores them again.

`Ledger` is the protocol the job uses; `SQLiteLedger` is the embedded one (WAL mode,
synchronous=FULL: a committed row survives a crash or a power cut); `PostgresLedger`
(ledger_postgres.py) is the same protocol in a PostgreSQL schema.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from falconet.batch.records import Cursor
from falconet.errors import BatchError

SCHEMA_NAME = "falconet-batch-ledger"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

State = Literal["pending", "done", "rejected"]
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inputs (name TEXT PRIMARY KEY, offset INTEGER NOT NULL, lines INTEGER NOT NULL);
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected')),
    source TEXT NOT NULL,
    record TEXT,
    line TEXT
);
CREATE INDEX records_pending ON records(seq) WHERE state = 'pending';
CREATE TABLE emitted (sink TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Admission:
    """A record taken in: pending with its record text, or rejected with its line."""

    key: str
    source: str  # "records.jsonl:17"
    state: State
    record: str | None = None
    line: str | None = None


@dataclass(frozen=True)
class Pending:
    seq: int
    key: str
    source: str
    record: str


@dataclass(frozen=True)
class Outcome:
    seq: int
    state: State  # "done" or "rejected"
    line: str


@dataclass(frozen=True)
class Finished:
    seq: int
    state: State
    line: str


@dataclass(frozen=True)
class Emitted:
    """How far the output files reach: every finished row up to `seq` is in them, and
    each file (by sink name) was `sizes[name]` bytes when that was recorded."""

    seq: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Ledger(Protocol):
    def claim_job(self, job: dict) -> None:
        """Record `job` (what makes its results: template, model, sampling) in a new
        ledger; in a used one, raise BatchError when it was another job."""

    def cursors(self) -> dict[str, Cursor]: ...

    def admit(self, name: str, cursor: Cursor, entries: Sequence[Admission]) -> list[int | None]:
        """Insert `entries` and move input `name` to `cursor`, in one transaction.
        Returns each entry's seq, None for a duplicate (a key already in the ledger)."""

    def pending(self, after: int, limit: int) -> list[Pending]:
        """Pending rows after seq `after`, in seq order."""

    def finish(self, outcomes: Sequence[Outcome]) -> int:
        """Pending -> done/rejected with their lines, in one transaction. Returns how
        many changed (a row no longer pending is left as it is)."""

    def finished(self, after: int, limit: int) -> list[Finished]:
        """Rows after seq `after` in seq order, up to the first still pending."""

    def emitted(self) -> Emitted: ...

    def mark_emitted(self, emitted: Emitted) -> None: ...

    def counts(self) -> dict[str, int]:
        """Rows by state, and "duplicates" seen."""

    def close(self) -> None: ...


class SQLLedger:
    """What the SQLite and PostgreSQL ledgers share: the same tables, read and changed by
    the same statements in the driver's placeholder style (`P`). A subclass gives
    `_read(sql, params) -> rows`, `_write()` (one transaction, yielding something with
    `execute`), `display` (where the ledger is, for messages) and `next_job_hint`; one
    that can lose its connection overrides `_transact` to run a transaction again."""

    P = "?"
    display: str
    next_job_hint: str

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.P)

    def _check_job(self, stored: str, text: str) -> None:
        """Refuse a job whose settings differ from the one that owns the ledger."""
        old, job = json.loads(stored), json.loads(text)  # tuples compare as the lists stored
        changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        if changed:
            raise BatchError(
                f"the ledger {self.display} belongs to a job with another "
                f"{', '.join(changed)}; resume it with the same settings, or "
                f"{self.next_job_hint} to start another job"
            )

    def pending(self, after: int, limit: int) -> list[Pending]:
        rows = self._read(
            self._sql("SELECT seq, key, source, record FROM records"
                      " WHERE state = 'pending' AND seq > ? ORDER BY seq LIMIT ?"),
            (after, limit),
        )  # fmt: skip
        return [Pending(*r) for r in rows]

    def _transact(self, body: Callable[[Any], T]) -> T:
        """`body(db)` in one write transaction; its result."""
        with self._write() as db:
            return body(db)

    def finish(self, outcomes: Sequence[Outcome]) -> int:
        sql = self._sql("UPDATE records SET state = ?, line = ?, record = NULL"
                        " WHERE seq = ? AND state = 'pending'")  # fmt: skip

        def body(db) -> int:
            return sum(db.execute(sql, (o.state, o.line, o.seq)).rowcount for o in outcomes)

        return self._transact(body)

    def finished(self, after: int, limit: int) -> list[Finished]:
        rows = self._read(
            self._sql("SELECT seq, state, line FROM records WHERE seq > ? ORDER BY seq LIMIT ?"),
            (after, limit),
        )
        out = []
        for seq, state, line in rows:
            if state == "pending":
                break
            out.append(Finished(seq, state, line))
        return out

    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "done": 0, "rejected": 0}
        counts.update(self._read("SELECT state, count(*) FROM records GROUP BY state"))
        duplicates = self._read("SELECT value FROM meta WHERE key = 'duplicates'")
        counts["duplicates"] = int(duplicates[0][0]) if duplicates else 0
        return counts

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SQLiteLedger(SQLLedger):
    next_job_hint = "give a new --out (or --ledger)"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.display = str(self.path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as e:
            raise BatchError(f"cannot open the ledger {self.path}: {e}") from e
        try:
            self._setup()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise BatchError(
                f"{self.path} is not a readable batch ledger ({e}); give another --ledger"
            ) from e
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise BatchError(f"{self.path}: SQLite could not switch to WAL mode")
        db.execute("PRAGMA synchronous = FULL")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            # One script, one transaction: the schema appears whole or not at all.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA}"
                f" INSERT INTO meta VALUES ('schema', '{SCHEMA_NAME}'),"
                f" ('schema_version', '{SCHEMA_VERSION}'), ('emitted_seq', '0'),"
                " ('duplicates', '0'); COMMIT;"
            )
            return
        meta = (
            dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        )
        if meta.get("schema") != SCHEMA_NAME:
            raise BatchError(f"{self.path} is an SQLite file but not a falconet batch ledger")
        if int(meta.get("schema_version", "0")) != SCHEMA_VERSION:
            raise BatchError(
                f"{self.path} has ledger schema {meta.get('schema_version')}; this falconet "
                f"reads schema {SCHEMA_VERSION}"
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (also on SIGKILL)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def claim_job(self, job: dict) -> None:
        text = json.dumps(job, sort_keys=True)
        with self._write() as db:
            stored = self._meta("job")
            if stored is None:
                db.execute("INSERT INTO meta VALUES ('job', ?)", (text,))
                return
        self._check_job(stored, text)

    def cursors(self) -> dict[str, Cursor]:
        rows = self._db.execute("SELECT name, offset, lines FROM inputs").fetchall()
        return {name: Cursor(offset, lines) for name, offset, lines in rows}

    def admit(self, name: str, cursor: Cursor, entries: Sequence[Admission]) -> list[int | None]:
        seqs: list[int | None] = []
        with self._write() as db:
            for e in entries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO records (key, state, source, record, line)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (e.key, e.state, e.source, e.record, e.line),
                )
                seqs.append(cur.lastrowid if cur.rowcount else None)
            duplicates = seqs.count(None)
            db.execute(
                "INSERT INTO inputs VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET offset = excluded.offset, lines = excluded.lines",
                (name, cursor.offset, cursor.lines),
            )
            if duplicates:
                db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'duplicates'",
                    (duplicates,),
                )
        return seqs

    def emitted(self) -> Emitted:
        sizes = dict(self._db.execute("SELECT sink, bytes FROM emitted").fetchall())
        return Emitted(int(self._meta("emitted_seq") or 0), sizes)

    def mark_emitted(self, emitted: Emitted) -> None:
        with self._write() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'emitted_seq'", (str(emitted.seq),))
            db.executemany(
                "INSERT INTO emitted VALUES (?, ?) ON CONFLICT (sink) DO UPDATE"
                " SET bytes = excluded.bytes",
                sorted(emitted.sizes.items()),
            )
