"""The batch ledger in PostgreSQL: the same tables and the same transactions as
`SQLiteLedger` (ledger.py says what each keeps and why), in a schema of its own
(`postgresql://...?schema=NAME`, default falconet_batch), for a job whose state should
live in a database server rather than a file beside its output.

The tables are created once, under an advisory lock, so two workers starting together
do not both build them. `admit` also takes an advisory lock for its transaction: seqs
come from a sequence, and without it one connection could commit seq 7 while another
still holds seq 6 uncommitted, and `finished` (which stops at the first pending row)
would emit 7 before 6 exists.

A connection the server drops (a restart, a failover, an administrator's
pg_terminate_backend) is opened again, and the transaction it was running is run again
from the start: it had rolled back, or, when the drop came while its COMMIT was
acknowledged, had committed, and each transaction is safe to repeat (`finish` changes only
pending rows, `admit` inserts only new keys, the rest set values). The one trace such a
lost acknowledgement leaves: the repeated `admit` counts its own records as duplicates.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlsplit

from falconet.batch.ledger import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    Admission,
    Emitted,
    SQLLedger,
    T,
)
from falconet.batch.records import Cursor
from falconet.errors import BatchError, RagError

DEFAULT_SCHEMA = "falconet_batch"
CONNECT_TIMEOUT_S = 10
RECONNECT_TRIES = 5  # after a dropped connection, waiting 0.5, 1, 2, 4 s between tries

_SCHEMA = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE inputs (name text PRIMARY KEY, "offset" bigint NOT NULL, lines bigint NOT NULL);
CREATE TABLE records (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text NOT NULL UNIQUE,
    state text NOT NULL CHECK (state IN ('pending', 'done', 'rejected')),
    source text NOT NULL,
    record text,
    line text
);
CREATE INDEX records_pending ON records (seq) WHERE state = 'pending';
CREATE TABLE emitted (sink text PRIMARY KEY, bytes bigint NOT NULL);
"""


def parse_ledger_url(url: str):
    """The `Location` (rag/postgres_schema.py) of a ledger URL, schema checked; a
    BatchError for a URL or schema name PostgreSQL or falconet would refuse."""
    from falconet.rag.postgres_schema import parse_url

    try:
        location = parse_url(url)
    except RagError as e:
        raise BatchError(
            f"--ledger: {str(e).replace('store collection', 'ledger schema')}"
        ) from None
    except ImportError as e:
        raise BatchError(f"a PostgreSQL ledger needs psycopg: pip install psycopg ({e})") from None
    if "schema" not in dict(parse_qsl(urlsplit(url).query, keep_blank_values=True)):
        location = dataclasses.replace(location, schema=DEFAULT_SCHEMA)
    return location


class PostgresLedger(SQLLedger):
    """A `Ledger` in a PostgreSQL schema. One connection, shared by the job's threads
    under a lock (as SQLiteLedger's is)."""

    P = "%s"
    next_job_hint = "give another --ledger"

    def __init__(self, url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.location = parse_ledger_url(url)
        self.schema = self.location.schema
        self.display = f"{self.location.display} (schema {self.schema})"
        self._lock = threading.Lock()
        self._db = self._connect()
        try:
            with self._errors():
                self._setup()
        except BaseException:
            self._db.close()
            raise

    def _connect(self):
        try:
            return self._psycopg.connect(self.location.url, autocommit=True,
                                         connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="falconet-batch")  # fmt: skip
        except self._psycopg.Error as e:
            raise BatchError(
                f"cannot connect to the ledger at {self.display}: {_line(e)}"
            ) from None

    def _reconnect(self, tries: int) -> None:
        """A new connection in place of a dropped one (the server may be restarting)."""
        self._db.close()
        for i in range(tries):
            time.sleep(0.5 * 2**i)
            try:
                self._db = self._connect()
            except BatchError:
                if i == tries - 1:
                    raise
                continue
            self._db.execute(f'SET search_path TO "{self.schema}"')
            return

    def _retrying(self, work: Callable[[], T]) -> T:
        """`work()`, run again on a new connection when the server dropped the old one
        (see the module docstring); the caller holds the lock."""
        attempt = 0
        while True:
            try:
                with self._errors():
                    return work()
            except BatchError:
                if not (self._db.closed or self._db.broken) or attempt == RECONNECT_TRIES:
                    raise
            attempt += 1
            self._reconnect(RECONNECT_TRIES)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._psycopg.Error as e:
            raise BatchError(f"the ledger at {self.display}: {_line(e)}") from e

    def _setup(self) -> None:
        db, schema = self._db, self.schema
        with db.transaction():
            # One worker builds the tables; the others wait here and then find them.
            db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("falconet-batch:" + schema,))
            db.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            db.execute(f'SET LOCAL search_path TO "{schema}"')
            tables = {r[0] for r in db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}  # fmt: skip
            if not tables:
                db.execute(_SCHEMA)
                db.execute("INSERT INTO meta VALUES ('schema', %s), ('schema_version', %s),"
                           " ('emitted_seq', '0'), ('duplicates', '0')",
                           (SCHEMA_NAME, str(SCHEMA_VERSION)))  # fmt: skip
        db.execute(f'SET search_path TO "{schema}"')
        if tables:
            meta = dict(db.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            if meta.get("schema") != SCHEMA_NAME:
                raise BatchError(f"schema {schema} at {self.location.display} holds tables that "
                                 "are not a falconet batch ledger; name another (?schema=NAME)")  # fmt: skip
            if int(meta.get("schema_version", "0")) != SCHEMA_VERSION:
                raise BatchError(f"the ledger at {self.display} has ledger schema "
                                 f"{meta.get('schema_version')}; this falconet reads schema "
                                 f"{SCHEMA_VERSION}")  # fmt: skip

    def _transact(self, body: Callable[[object], T]) -> T:
        """`body(db)` in one transaction: all of it commits, or none of it; run again on
        a new connection when the old one was dropped."""

        def once() -> T:
            with self._db.transaction():
                return body(self._db)

        with self._lock:
            return self._retrying(once)

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._retrying(lambda: self._db.execute(sql, params).fetchall())

    def claim_job(self, job: dict) -> None:
        text = json.dumps(job, sort_keys=True)

        def body(db) -> str:
            db.execute("INSERT INTO meta VALUES ('job', %s) ON CONFLICT DO NOTHING", (text,))
            return db.execute("SELECT value FROM meta WHERE key = 'job'").fetchone()[0]

        self._check_job(self._transact(body), text)

    def cursors(self) -> dict[str, Cursor]:
        rows = self._read('SELECT name, "offset", lines FROM inputs')
        return {name: Cursor(offset, lines) for name, offset, lines in rows}

    def admit(self, name: str, cursor: Cursor, entries: Sequence[Admission]) -> list[int | None]:
        return self._transact(lambda db: self._admit(db, name, cursor, entries))

    def _admit(
        self, db, name: str, cursor: Cursor, entries: Sequence[Admission]
    ) -> list[int | None]:
        seqs: list[int | None] = []
        # Admissions commit in seq order (see the module docstring).
        db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("falconet-batch-admit:" + self.schema,))  # fmt: skip
        for e in entries:
            row = db.execute(
                "INSERT INTO records (key, state, source, record, line)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING RETURNING seq",
                (e.key, e.state, e.source, e.record, e.line),
            ).fetchone()
            seqs.append(None if row is None else row[0])
        db.execute(
            "INSERT INTO inputs VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
            ' SET "offset" = excluded."offset", lines = excluded.lines',
            (name, cursor.offset, cursor.lines),
        )
        if duplicates := seqs.count(None):
            db.execute(
                "UPDATE meta SET value = (value::bigint + %s)::text WHERE key = 'duplicates'",
                (duplicates,),
            )
        return seqs

    def emitted(self) -> Emitted:
        def body(db) -> Emitted:  # one transaction: one snapshot of both
            sizes = dict(db.execute("SELECT sink, bytes FROM emitted").fetchall())
            seq = db.execute("SELECT value FROM meta WHERE key = 'emitted_seq'").fetchone()
            return Emitted(int(seq[0]), sizes)

        return self._transact(body)

    def mark_emitted(self, emitted: Emitted) -> None:
        self._transact(lambda db: self._mark_emitted(db, emitted))

    def _mark_emitted(self, db, emitted: Emitted) -> None:
        db.execute("UPDATE meta SET value = %s WHERE key = 'emitted_seq'", (str(emitted.seq),))
        for sink, size in sorted(emitted.sizes.items()):
            db.execute(
                "INSERT INTO emitted VALUES (%s, %s) ON CONFLICT (sink) DO UPDATE"
                " SET bytes = excluded.bytes",
                (sink, size),
            )


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
