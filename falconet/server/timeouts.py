"""Deadlines on what a client sends: a slow or stalled client costs the server one idle
socket, and that only for a bounded time.

    request head   --timeout-header (10 s): from a connection's first byte, or the first
                   byte of its next request, to the end of the request line and headers
                   (at most MAX_HEAD_BYTES); then a 408 and the connection is closed
    request body   --timeout-body (30 s), plus one second per MIN_BODY_RATE bytes that
                   arrived: a body trickled in byte by byte (slowloris) gets a 408, a
                   large upload on a slow but working link does not
    idle keep-alive --timeout-keep-alive (5 s, uvicorn's default): between requests

uvicorn's h11 protocol has the keep-alive timer and a bound on the head's size, but
nothing that ends a connection which sends half a request head and stalls: that is the
one piece added to the protocol (`HeadTimeoutProtocol`). The body deadline lives in the
app (`BodyDeadline`), where a 408 can be answered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from falconet.server import BODY_TIMEOUT_S
from falconet.server.fields import APIError

MIN_BODY_RATE = 16 * 1024  # bytes/s (128 kbit/s) a body must keep up to extend its deadline
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; larger gets a 400 (h11's default)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head. A connection that has
    sent nothing when it expires is closed silently (as an idle keep-alive one is); one
    that sent part of a head gets a 408 first."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # IDLE after the bytes were parsed: a request head has begun but is not complete.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why it is closed
            body = b"the request head did not arrive in time\n"
            headers = [(b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", str(len(body)).encode()), (b"connection", b"close")]  # fmt: skip
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=408, headers=headers,
                                                                 reason=b"Request Timeout")))  # fmt: skip
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # h11 will not frame it: close without a word
                pass
        self.transport.close()


def uvicorn_options(head_timeout: float, keep_alive: float) -> dict[str, Any]:
    """uvicorn.Config arguments for the HTTP protocol and its timeouts."""
    return {
        "http": functools.partial(HeadTimeoutProtocol, head_timeout=head_timeout),
        "timeout_keep_alive": keep_alive,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }


class BodyDeadline:
    """Pure ASGI middleware. A request body must arrive within `timeout` seconds of its
    head, plus one second per MIN_BODY_RATE bytes received; past that, the route reading
    it gets a 408 (APIError) and the connection is closed. A response that starts before
    the body was read to its end (a 401, a 404, an early 413) closes the connection too
    (`Connection: close`), so a client cannot keep it by trickling a body nobody reads."""

    def __init__(self, app: Any, timeout: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        start = time.monotonic()
        received = 0
        done = False

        async def timed_receive() -> dict:
            nonlocal received, done
            if done:
                return await receive()
            left = start + self.timeout + received / MIN_BODY_RATE - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive in time ({received} bytes "
                               f"in {time.monotonic() - start:.0f} s); send it faster",
                               code="request_timeout",
                               headers={"Connection": "close"}) from None  # fmt: skip
            received += len(message.get("body", b""))
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def closing_send(message: dict) -> None:
            if message["type"] == "http.response.start" and not done:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)


def _has_body(scope: dict) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False
