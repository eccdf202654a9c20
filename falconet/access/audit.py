"""The audit log: one record per HTTP request, hash-chained, in `<state dir>/audit.sqlite3`.

A record holds the time (UTC), the user, method, route and status, the model, the
collection, the sha256 and length of the prompt (its text only with --audit-prompts) and
the ids of the documents the request retrieved or changed. Each record's `hash` is the
sha256 of the previous record's hash and the record's own fields (canonical JSON), so an
edited record no longer matches its hash and a deleted one breaks the chain or the
sequence numbers: `verify` names the first bad record.

Why SQLite and not JSON lines: a record is committed in one transaction (WAL,
synchronous=FULL), so a process killed while logging leaves either the whole record or none
of it -- never a torn last line that a verifier must guess about -- and concurrent servers
on one log are serialised by SQLite's write lock, which reads the previous hash and appends
in the same transaction. `export --since` is then an indexed query.

The chain detects edits and deletions by anyone who does not recompute every later hash.
The `sqlite_sequence` row also catches a deleted tail; an operator who must prove the log
was not rewritten wholesale keeps `verify`'s head hash somewhere else from time to time.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from falconet.durable import connect_wal
from falconet.errors import AccessError

AUDIT_FILE = "audit.sqlite3"
GENESIS = "0" * 64  # the previous hash of the first record
FIELDS = ("seq", "time", "user", "method", "route", "status", "model", "collection",
          "prompt_sha256", "prompt_chars", "prompt", "documents", "prev_hash", "hash")  # fmt: skip
_HASHED = FIELDS[:-1]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, user TEXT, method TEXT NOT NULL,
    route TEXT NOT NULL, status INTEGER NOT NULL, model TEXT, collection TEXT,
    prompt_sha256 TEXT, prompt_chars INTEGER, prompt TEXT, documents TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time);
"""


def utc_now() -> str:
    """Fixed-width ISO 8601 in UTC, so that text order is time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_since(value: str) -> str:
    """A date or date-time (UTC unless it names its offset) as the log's time format."""
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise AccessError(f"--since {value!r} is not a date; give one such as 2026-01-31 "
                          "or 2026-01-31T08:00:00Z") from e  # fmt: skip
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(record: dict[str, Any]) -> str:
    canonical = json.dumps({k: record[k] for k in _HASHED}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Verdict:
    records: int
    head: str  # the last record's hash
    problem: str | None  # names the first bad record; None: the chain holds

    @property
    def ok(self) -> bool:
        return self.problem is None


class AuditLog:
    """Appends and reads the log; safe to share between threads (a connection each)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not create and not self.path.is_file():
            raise AccessError(f"{self.path}: no audit log (it is written by `falconet serve "
                              "--state-dir DIR`)")  # fmt: skip
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        with contextlib.closing(db.cursor()) as c:
            c.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = connect_wal(self.path)
            except sqlite3.DatabaseError as e:
                raise AccessError(f"{self.path}: not a falconet audit log ({e})") from e
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def append(self, entry: dict[str, Any]) -> int:
        """Writes one record (FIELDS but seq, prev_hash and hash); returns its seq."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the previous hash and the insert in one transaction
        try:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (_next_seq(db), GENESIS)
            record = {k: entry.get(k) for k in FIELDS}
            record.update(seq=seq, prev_hash=prev, documents=entry.get("documents") or [])
            record["hash"] = record_hash(record)
            row = {**record, "documents": json.dumps(record["documents"])}
            db.execute(f"INSERT INTO audit ({', '.join(FIELDS)}) VALUES "
                       f"({', '.join('?' * len(FIELDS))})", [row[k] for k in FIELDS])  # fmt: skip
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return seq

    def records(self, since: str | None = None) -> Iterator[dict[str, Any]]:
        sql, args = f"SELECT {', '.join(FIELDS)} FROM audit", ()
        if since is not None:
            sql, args = sql + " WHERE time >= ?", (since,)
        for row in self._db().execute(sql + " ORDER BY seq", args):
            record = dict(zip(FIELDS, row, strict=True))
            # an edited record may hold anything here: verify names it, export shows it
            with contextlib.suppress(TypeError, ValueError):
                record["documents"] = json.loads(record["documents"])
            yield record

    def verify(self) -> Verdict:
        """Walks the chain; the first record that does not hold is named."""
        prev, expected, count = GENESIS, 1, 0
        for record in self.records():
            seq = record["seq"]
            if seq != expected:
                return Verdict(count, prev, f"record {expected}: missing (deleted); the log "
                               f"goes on at record {seq}")  # fmt: skip
            if record["prev_hash"] != prev:
                what = "the log's start" if seq == 1 else f"record {seq - 1}'s hash"
                return Verdict(count, prev, f"record {seq}: its previous hash does not match "
                               f"{what} (a record before it was edited)")  # fmt: skip
            if record_hash(record) != record["hash"]:
                return Verdict(count, prev, f"record {seq}: its fields do not match its hash "
                               "(the record was edited)")  # fmt: skip
            prev, expected, count = record["hash"], seq + 1, count + 1
        top = _next_seq(self._db()) - 1
        if top >= expected:
            return Verdict(count, prev, f"record {expected}: missing (deleted); the log once "
                           f"held records up to {top}")  # fmt: skip
        return Verdict(count, prev, None)

    def export(self, out: TextIO, since: str | None = None, fmt: str = "jsonl") -> int:
        """Writes the records from `since` on to `out` as CSV or JSON lines; returns how many."""
        n = 0
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(FIELDS)
            for record in self.records(since):
                record["documents"] = json.dumps(record["documents"])
                writer.writerow([record[k] for k in FIELDS])
                n += 1
        elif fmt == "jsonl":
            for record in self.records(since):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        else:
            raise AccessError(f"--format {fmt!r}: give csv or jsonl")
        return n


def _next_seq(db: sqlite3.Connection) -> int:
    """One more than the highest seq ever given (AUTOINCREMENT's record of it)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    return (row[0] if row else 0) + 1
