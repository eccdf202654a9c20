"""Shared by the multi-user tests: the `falconet` CLI as a subprocess, audit-log reading."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`falconet ARGS` as a subprocess, without any FALCONET_STATE_DIR of the caller's."""
    base = {k: v for k, v in os.environ.items() if k != "FALCONET_STATE_DIR"}
    return subprocess.run([sys.executable, "-m", "falconet", *args], capture_output=True,
                          text=True, env={**base, **ENV, **(env or {})}, timeout=120)  # fmt: skip


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """The same command through `falconet.cli.main.main` in this process: the real CLI
    without a new interpreter's seconds of imports (the state commands load no model)."""
    from falconet.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.pop("FALCONET_STATE_DIR", None)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        if saved is not None:
            os.environ["FALCONET_STATE_DIR"] = saved
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def add_user(state: Path, name: str, *flags: str) -> str:
    r = cli_here("users", "add", name, *flags, "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def audit_rows(state: Path) -> list[dict]:
    """Every audit record, read-only (the server may be writing)."""
    db = sqlite3.connect(f"file:{state / 'audit.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        db.close()


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite file whose WAL may still hold pages."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()
