"""`falconet batch run` SIGKILLed at random moments and restarted, on the SQLite ledger and
on the PostgreSQL one: the results file is byte for byte the one an uninterrupted run
writes (one line per valid record, in input order, the same text at temperature 0), and
so is the rejects file. Also SIGTERM: a
followed job stops cleanly, and what it had in flight is scored by the next run."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.crash_tools import CRASH_ENV, Zygote, run_with_kills

RECORDS = 1000
KILLS = 20
BAD_EVERY = 97  # a line that is not a record, now and then


def write_input(path: Path) -> set[str]:
    """RECORDS records (ids 0..) with a bad line every BAD_EVERY; returns the valid keys."""
    lines = []
    for i in range(RECORDS):
        lines.append(json.dumps({"id": i, "text": f"record {i}: " + "fox " * (i % 7)}))
        if i % BAD_EVERY == 5:
            lines.append(f'{{"id": "broken {i}", ')
    path.write_text("\n".join(lines) + "\n")
    return {str(i) for i in range(RECORDS)}


def finished_rows(ledger: Path) -> int:
    """Rows done or rejected, read over a read-only connection (no recovery written: the
    restarted process is the one that finds the crashed state)."""
    if not ledger.exists():
        return 0
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM records WHERE state != 'pending'").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the schema was committed
        return 0
    finally:
        db.close()


def job_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "run", "--input", "in.jsonl", "--prompt", "p.txt", "--out", str(out),
            "--key", "id", "-m", str(model), "--max-tokens", "3", "--max-batch", "32", *extra]  # fmt: skip


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_sigkill_at_random_moments_then_restart_equals_an_uninterrupted_run(
    tmp_path, tiny_7b, ledger, request
):
    keys = write_input(tmp_path / "in.jsonl")
    (tmp_path / "p.txt").write_text("Note: {{ text }}\nLabel:")
    log = tmp_path / "run.log"
    crashed = tmp_path / "crashed" / "out.jsonl"
    if ledger == "sqlite":  # the default: a file beside the results
        argv = job_argv(tiny_7b, crashed)
        progress = lambda: finished_rows(crashed.with_name("out.jsonl.ledger"))  # noqa: E731
    else:
        from tests.pg_tools import new_schema, schema_url
        from tests.test_batch_postgres import finished_rows as finished_in

        url = schema_url(request.getfixturevalue("pg_url"), new_schema())
        argv = job_argv(tiny_7b, crashed, "--ledger", url)
        progress = lambda: finished_in(url)  # noqa: E731
    zygote = Zygote(tmp_path)
    try:
        todo = RECORDS + RECORDS // BAD_EVERY + 1
        killed, _, landed = run_with_kills(
            zygote, argv, log, random.Random(18), KILLS, "falconet batch:", progress, todo
        )
        assert killed == KILLS
        assert landed >= KILLS // 2, f"only {landed} kills landed while the job was under way"
        pid = zygote.start(argv, log)
        assert zygote.wait(pid) == 0, log.read_text()
        clean = tmp_path / "clean" / "out.jsonl"
        pid = zygote.start(job_argv(tiny_7b, clean), log)
        assert zygote.wait(pid) == 0, log.read_text()
    finally:
        zygote.close()
    results = [json.loads(line) for line in crashed.read_text().splitlines()]
    assert sorted(r["key"] for r in results) == sorted(keys)  # each valid record once
    assert crashed.read_bytes() == clean.read_bytes()
    rejects = crashed.with_name("out.rejects.jsonl")
    assert rejects.read_bytes() == clean.with_name("out.rejects.jsonl").read_bytes()
    assert len(rejects.read_text().splitlines()) == RECORDS // BAD_EVERY + 1


def test_sigterm_stops_a_followed_job_and_the_next_run_finishes_it(tmp_path, tiny_7b):
    write_input(tmp_path / "in.jsonl")
    (tmp_path / "p.txt").write_text("Note: {{ text }}\nLabel:")
    log = tmp_path / "run.log"
    out = tmp_path / "out.jsonl"
    zygote = Zygote(tmp_path)
    try:
        pid = zygote.start(job_argv(tiny_7b, out, "--follow"), log)
        deadline = time.monotonic() + 120
        while finished_rows(tmp_path / "out.jsonl.ledger") < 50:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        assert zygote.wait(pid) == 0, log.read_text()
        summary = log.read_text().splitlines()[-1]
        assert summary.endswith("pending, 0 duplicates skipped (stopped; run again to go on)"), (
            summary
        )
        pid = zygote.start(job_argv(tiny_7b, out), log)
        assert zygote.wait(pid) == 0, log.read_text()
    finally:
        zygote.close()
    assert (
        log.read_text().splitlines()[-1]
        == "1000 done, 11 rejected, 0 pending, 0 duplicates skipped"
    )
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert keys == [str(i) for i in range(RECORDS)]


# A job that SIGKILL finds between appending lines to the outputs and recording that it
# did: the ledger's first mark_emitted pauses.
BETWEEN_APPEND_AND_RECORD = r"""
import sys, time
from pathlib import Path
import falconet
from falconet.batch import BatchJob, BatchSettings, SQLiteLedger
from falconet.sampling import SamplingParams

class PausingLedger(SQLiteLedger):
    def mark_emitted(self, emitted):
        print("inside", flush=True)
        time.sleep(60)

out = Path(sys.argv[2])
settings = BatchSettings(Path("in.jsonl"), Path("p.txt").read_text(), out, key_field="id",
                         params=SamplingParams(max_tokens=3), max_batch=32)
BatchJob(falconet.load(sys.argv[1]), settings, PausingLedger(str(out) + ".ledger")).run()
"""


def test_sigkill_between_append_and_record_keeps_the_lines_once(tmp_path, tiny_7b):
    write_input(tmp_path / "in.jsonl")
    (tmp_path / "p.txt").write_text("Note: {{ text }}\nLabel:")
    out = tmp_path / "out.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", BETWEEN_APPEND_AND_RECORD, str(tiny_7b), str(out)],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=CRASH_ENV,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == "inside\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    written = out.read_bytes()
    assert written.count(b"\n") > 0  # lines the ledger has not counted yet
    zygote = Zygote(tmp_path)
    log = tmp_path / "run.log"
    try:
        for folder in ("", "clean"):
            pid = zygote.start(job_argv(tiny_7b, tmp_path / folder / "out.jsonl"), log)
            assert zygote.wait(pid) == 0, log.read_text()
    finally:
        zygote.close()
    assert out.read_bytes().startswith(written)
    assert out.read_bytes() == (tmp_path / "clean" / "out.jsonl").read_bytes()
