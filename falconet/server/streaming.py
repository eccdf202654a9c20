"""Server-sent events that notice a client going away, for every streaming route."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import Response

from falconet.server.fields import APIError
from falconet.server.responses import DONE, sse

log = logging.getLogger("falconet.server")


async def wait_disconnect(receive: Callable) -> None:
    """Returns when the client disconnects. Call it only once the body has been read:
    from then on the server's only message is http.disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """Server-sent events from an async iterator of bytes. Unlike StreamingResponse it
    always listens for the client going away (also while a request waits in the queue
    and no byte is being sent), and it calls `on_close` however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]) -> None:
        self.events = events
        self.on_close = on_close  # called with True when the client went away first
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = ended = False
        left_early = False  # the client went away before the last byte was sent

        async def stream() -> None:
            nonlocal started, ended
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            started = True
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            ended = True

        async def watch() -> None:
            nonlocal left_early
            await wait_disconnect(receive)
            # Servers answer http.disconnect once a response is complete too: that is a
            # normal end, not a client that left.
            left_early = not ended

        sender = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(watch())
        shutting_down = False
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server's shutdown grace period ran out
            shutting_down = True
        for task in (sender, watcher):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(sender, watcher, return_exceptions=True)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.events.aclose()  # type: ignore[attr-defined]
        failure = sender.exception() if sender.done() and not sender.cancelled() else None
        # OSError: a send to a client that has gone (ASGI spec 2.4 servers)
        self.on_close(left_early or isinstance(failure, OSError))
        if shutting_down:  # end the stream properly rather than cut it mid-event
            with contextlib.suppress(Exception, asyncio.CancelledError):
                if not started:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})  # fmt: skip
                error = APIError(503, "the server is shutting down", code="shutting_down")
                await send({"type": "http.response.body", "body": sse(error.body()) + DONE,
                            "more_body": False})  # fmt: skip
        elif failure is not None and not isinstance(failure, OSError):
            log.error("event stream failed", exc_info=failure)
