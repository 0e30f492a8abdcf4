"""The service's HTTP protocol: uvicorn's h11 protocol with the connection limits it lacks.

uvicorn closes an idle keep-alive connection after a response, but not a connection that never
sends a request, or sends only part of its headers: 20,000 such connections held the service at
its file-descriptor limit (and uvicorn's default parser, httptools, took a 2 MB header). Here:

- a connection must complete its request headers within `header_timeout` seconds of opening (or of
  the previous response); otherwise it is closed;
- the request head (target + headers) may be at most `max_header_bytes`: a larger one is answered
  400 and closed, whether it arrived in pieces (h11's incomplete-event limit) or at once (checked
  on the parsed request); this also bounds the number of headers;
- uvicorn's `limit_concurrency` bounds the connections and tasks of an HTTP worker (503 beyond).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a deadline for request headers (`config.header_timeout`, seconds)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm()
        limit = self.config.h11_max_incomplete_event_size
        next_event = self.conn.next_event

        def checked_next_event():  # uvicorn answers RemoteProtocolError with a 400 and closes
            event = next_event()
            if isinstance(event, h11.Request) and limit:
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if size > limit:
                    raise h11.RemoteProtocolError(f"request head of {size} bytes > {limit}")
            return event

        self.conn.next_event = checked_next_event

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress yet
        if not waiting:
            self._disarm()
        elif self._header_deadline is None:  # bytes of a next request began after a response
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # uvicorn's keep-alive timer takes over until the next bytes arrive

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        timeout = getattr(self.config, "header_timeout", None)
        if timeout:
            self._header_deadline = self.loop.call_later(timeout, self._headers_too_late)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()
