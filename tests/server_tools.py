"""A real `falconet serve` process for the server tests: started on a free port (port 0,
read back from its "falconet serving ... on http://HOST:PORT" line), waited for on
/health, and stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

START_TIMEOUT_S = 120  # generous: only there so a broken server cannot hang the suite


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = ["--port", "0", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "falconet", "serve", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []  # stderr, read by a thread so the pipe never fills
        self._listening = threading.Event()
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.match(r"falconet serving \S+ on http://127\.0\.0\.1:(\d+) ", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()  # the process ended

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> ServerProcess:
        self._listening.wait(START_TIMEOUT_S)
        if self.port is None:
            self.stop()
            raise RuntimeError("falconet serve did not start:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("falconet serve never answered /health")

    def __enter__(self) -> ServerProcess:
        try:
            return self.wait_ready()
        except BaseException:  # never leave a half-started server behind
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def openai_client(self, timeout: float):
        """The official client on this server (no retries: a retry would hide an error)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=timeout,
                             max_retries=0)  # fmt: skip

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def sse_events(lines) -> list:
    """The `data:` payloads of an SSE response, "[DONE]" kept as a string."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
