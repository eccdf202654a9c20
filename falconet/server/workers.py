"""Worker threads for the CPU work of requests, so the event loop never computes.

Parsing a JSON body, validating it, tokenizing a prompt, rendering a chat template and
serializing a large answer (/tokenize of a 4 MiB text is a megabyte of ids) can each
take seconds for a large request. Done on the event loop, that time freezes every other
connection: /health, running streams, new requests. Here it runs in worker threads
(anyio's, which starlette uses too), with two bounds:

- at most `threads` of these jobs run at once (a CapacityLimiter of their own, so they
  never take the threads the RAG store calls use, nor the other way round);
- at most `max_waiting` more wait for a thread; a request beyond that gets a 429 with
  Retry-After at once, as the engine's full queue does, rather than piling up.

The GIL still serializes pure-Python work, but CPython hands it to the event loop every
few milliseconds, and the heavy native parts (the Rust tokenizer's `encode_batch`) let
go of it entirely.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from falconet.server.fields import APIError

T = TypeVar("T")

# Tokenizing uses one core per job; a few more than the cores keep them busy while one
# job waits on the GIL for its Python parts.
REQUEST_THREADS = min(8, (os.cpu_count() or 1) + 2)
MAX_WAITING = 64  # as the engine's default --max-queue


class RequestWorkers:
    """Runs a request's CPU work in a worker thread: `await workers.run(fn, *args)`."""

    def __init__(self, threads: int = REQUEST_THREADS, max_waiting: int = MAX_WAITING) -> None:
        if threads < 1 or max_waiting < 0:
            raise ValueError("RequestWorkers needs threads >= 1 and max_waiting >= 0")
        self.threads = threads
        self.max_waiting = max_waiting
        self.pending = 0  # jobs running or waiting; touched only on the event loop
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, fn: Callable[..., T], *args: Any, may_refuse: bool = True) -> T:
        """`fn(*args)` in a worker thread. With `may_refuse=False` the job waits however
        busy the threads are: for work whose cost was already paid (the answer of a
        finished generation, whose number the engine's own limits bound)."""
        if may_refuse and self.pending >= self.threads + self.max_waiting:
            raise APIError(
                429,
                f"the server is busy: {self.pending} requests are being prepared; retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        if self._limiter is None:  # made on the event loop that uses it
            self._limiter = anyio.CapacityLimiter(self.threads)
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self.pending -= 1
