"""`falconet batch run --ledger postgresql://...`: the ledger's bookkeeping in a real
PostgreSQL (pending -> finished only once, admission and duplicates), the CLI's results
byte for byte those of a run on the SQLite ledger, also after a SIGKILL and a restart,
a connection the server drops mid-job reopened (the job goes on, exactly once), and
one-line errors for a bad URL, a hostile schema name, an unreachable server and a
schema that holds something else."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psycopg
import pytest

from falconet.batch import open_ledger
from falconet.batch.ledger import Admission, Emitted, Finished, Outcome
from falconet.batch.ledger_postgres import PostgresLedger
from falconet.batch.records import Cursor
from falconet.errors import BatchError
from tests.conftest import assert_cli_error
from tests.crash_tools import CRASH_ENV
from tests.pg_tools import new_schema, schema_url
from tests.test_batch import TEMPLATE, cli, records, write_jsonl


@pytest.fixture
def url(pg_url) -> str:
    return schema_url(pg_url, new_schema())


def test_the_ledger_protocol_on_postgresql(url):
    with open_ledger(url) as ledger:
        assert isinstance(ledger, PostgresLedger)
        ledger.claim_job({"template": "t", "n": (1, 2)})
        ledger.claim_job({"template": "t", "n": (1, 2)})  # the same job again
        with pytest.raises(BatchError, match="another template"):
            ledger.claim_job({"template": "u", "n": (1, 2)})
        entries = [Admission("a", "in:1", "pending", record="{}"),
                   Admission("b", "in:2", "rejected", line="bad"),
                   Admission("a", "in:3", "pending", record="{}"),
                   Admission("c", "in:4", "pending", record="{}")]  # fmt: skip
        seqs = ledger.admit("in", Cursor(40, 4), entries)
        assert seqs[2] is None and seqs[0] < seqs[1] < seqs[3]
        assert ledger.cursors() == {"in": Cursor(40, 4)}
        assert [p.key for p in ledger.pending(0, 10)] == ["a", "c"]
        assert ledger.finished(0, 10) == []  # "a" is still pending
        a, c = seqs[0], seqs[3]
        assert ledger.finish([Outcome(a, "done", "A"), Outcome(c, "rejected", "C")]) == 2
        assert ledger.finish([Outcome(a, "rejected", "again")]) == 0  # only from pending
        assert ledger.finished(0, 10) == [
            Finished(a, "done", "A"), Finished(seqs[1], "rejected", "bad"),
            Finished(c, "rejected", "C")]  # fmt: skip
        ledger.mark_emitted(Emitted(c, {"results": 2, "rejects": 8}))
        assert ledger.counts() == {"pending": 0, "done": 1, "rejected": 2, "duplicates": 1}
    with open_ledger(url) as again:  # reopened: all of it committed, tables not rebuilt
        assert again.emitted() == Emitted(c, {"results": 2, "rejects": 8})
        assert again.cursors() == {"in": Cursor(40, 4)}


def test_a_schema_with_other_tables_is_refused(pg_url):
    schema = new_schema()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.accounts (id int)")
    with pytest.raises(BatchError, match="not a falconet batch ledger; name another"):
        open_ledger(schema_url(pg_url, schema))


def job_args(tiny_7b, ledger: str, out: str = "o.jsonl") -> list[str]:
    return ["batch", "run", "--input", "in.jsonl", "--prompt", "p.txt", "--out", out,
            "--key", "id", "-m", str(tiny_7b), "--max-tokens", "4", "--max-batch", "4",
            "--ledger", ledger]  # fmt: skip


def test_cli_on_postgresql_writes_what_the_sqlite_ledger_writes(tiny_7b, tmp_path, url):
    write_jsonl(tmp_path / "in.jsonl", [*records(6), "[]", records(1, 2)[0]])
    (tmp_path / "p.txt").write_text(TEMPLATE)
    res = cli(*job_args(tiny_7b, url), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "6 done, 1 rejected, 0 pending, 1 duplicates skipped\n"
    lite = cli(*job_args(tiny_7b, "s.ledger", "s.jsonl"), cwd=tmp_path)
    assert lite.returncode == 0 and lite.stdout == res.stdout, lite.stderr
    assert (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "s.jsonl").read_bytes()
    assert (tmp_path / "o.rejects.jsonl").read_bytes() == (
        tmp_path / "s.rejects.jsonl"
    ).read_bytes()


def finished_rows(url: str) -> int:
    from falconet.rag.postgres_schema import parse_url

    location = parse_url(url)
    with psycopg.connect(location.url, autocommit=True) as conn:
        table = f"{location.schema}.records"
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return 0
        return conn.execute(f"SELECT count(*) FROM {table} WHERE state != 'pending'").fetchone()[0]


def test_sigkill_mid_run_then_restart_equals_the_sqlite_run(tiny_7b, tmp_path, url):
    n = 120
    write_jsonl(tmp_path / "in.jsonl", records(n))
    (tmp_path / "p.txt").write_text(TEMPLATE)
    argv = [sys.executable, "-m", "falconet", *job_args(tiny_7b, url)]
    child = subprocess.Popen(argv, cwd=tmp_path, env=CRASH_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (done := finished_rows(url)) < 8:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert done < n, "the job ended before the kill"
    res = cli(*job_args(tiny_7b, url), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{n} done, 0 rejected, 0 pending, 0 duplicates skipped\n"
    lite = cli(*job_args(tiny_7b, "s.ledger", "s.jsonl"), cwd=tmp_path)
    assert lite.returncode == 0, lite.stderr
    assert (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "s.jsonl").read_bytes()


def test_a_dropped_connection_is_reopened_and_the_job_goes_on(tiny_7b, tmp_path, pg_url, url):
    n = 120
    write_jsonl(tmp_path / "in.jsonl", records(n))
    (tmp_path / "p.txt").write_text(TEMPLATE)
    argv = [sys.executable, "-m", "falconet", *job_args(tiny_7b, url)]
    child = subprocess.Popen(argv, cwd=tmp_path, env=CRASH_ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    drops = 0
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            deadline = time.monotonic() + 120
            # Drop the job's connection three times, each once it has scored more records.
            while drops < 3 and child.poll() is None and time.monotonic() < deadline:
                if finished_rows(url) >= 8 * (drops + 1):
                    dropped = admin.execute(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                        " FROM pg_stat_activity WHERE application_name = 'falconet-batch'"
                    ).fetchone()[0]
                    drops += dropped > 0
                time.sleep(0.01)
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert drops == 3, "the job ended before its connection was dropped three times"
    assert child.returncode == 0, err
    assert out == f"{n} done, 0 rejected, 0 pending, 0 duplicates skipped\n"
    lite = cli(*job_args(tiny_7b, "s.ledger", "s.jsonl"), cwd=tmp_path)
    assert lite.returncode == 0, lite.stderr
    assert (tmp_path / "o.jsonl").read_bytes() == (tmp_path / "s.jsonl").read_bytes()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "ledger,needle",
    [
        ("postgresql://u@h/db?schema=x;drop", "'x;drop' cannot name a ledger schema"),
        ("postgresql://u@h/db?nosuchoption=1", "not a usable PostgreSQL URL"),
        (
            f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres",
            "cannot connect to the ledger at",
        ),
    ],
)
def test_cli_ledger_url_errors_are_one_line(tiny_7b, tmp_path, ledger, needle):
    write_jsonl(tmp_path / "in.jsonl", records(1))
    (tmp_path / "p.txt").write_text(TEMPLATE)
    assert_cli_error(cli(*job_args(tiny_7b, ledger), cwd=tmp_path), needle)
