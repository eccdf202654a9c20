"""Crash tests' tools: a zygote that forks real `falconet` CLI runs (imports paid once),
and a loop that SIGKILLs runs at random moments until a number of them were killed.

Used by the RAG store's ingest crash test and the batch ledger's; nothing that touches a
store, a thread pool or a model runs before the fork.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ZYGOTE = r"""
import importlib, json, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import falconet.cli
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            fd = os.open(cmd["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = 1
            try:
                rc = falconet.cli.main(cmd["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(pid, flush=True)
    else:
        print(os.waitpid(cmd["pid"], 0)[1], flush=True)
"""

# One torch thread in every process: the same numbers bit for bit in each of them, and a
# steady pace on a machine whose other core may be busy.
CRASH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Zygote:
    def __init__(self, cwd: Path, preload: tuple[str, ...] = ("torch", "tqdm")) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, *preload], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=cwd, env=CRASH_ENV,
        )  # fmt: skip

    def _ask(self, cmd: dict) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path) -> int:
        return self._ask({"op": "run", "argv": argv, "log": str(log)})

    def wait(self, pid: int) -> int:
        """The child's wait status (a zombie keeps its pid until then, so a late kill
        cannot hit another process)."""
        return self._ask({"op": "wait", "pid": pid})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_with_kills(
    zygote: Zygote,
    argv: list[str],
    log: Path,
    rng,
    kills: int,
    marker: str,
    progress: Callable[[], int],
    todo: int,
) -> tuple[int, int, int]:
    """Run argv again and again, SIGKILLing each run at a random moment after it starts
    its work (`marker` appears in its log), until `kills` runs were killed. The window for
    that moment widens while runs make no progress (a slow start on a busy machine) and
    narrows when the work would be done before the last kill; once a run finishes the
    job, later runs are killed during their start-up. Returns (killed, finished, landed):
    `landed` counts the kills that left the work part done (0 < progress < todo)."""
    killed = finished = landed = 0
    window = 0.5
    while killed < kills:
        assert killed + finished < 2 * kills, "the runs finish before they can be killed"
        log.write_text("")
        started = time.monotonic()
        before = progress()
        pid = zygote.start(argv, log)
        if finished:
            time.sleep(rng.uniform(0, 0.3))
        else:
            while marker not in log.read_text(errors="replace"):
                assert time.monotonic() < started + 120, log.read_text(errors="replace")
                time.sleep(0.005)
            time.sleep(rng.uniform(0, window))
        os.kill(pid, signal.SIGKILL)
        status = zygote.wait(pid)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
            landed += 0 < progress() < todo
        else:
            assert os.WEXITSTATUS(status) == 0, log.read_text(errors="replace")
            finished += 1
        done = progress() - before
        if done == 0:
            window = min(window * 1.5, 5.0)
        elif done * (kills - killed) > todo - progress():
            window *= 0.7
    return killed, finished, landed
