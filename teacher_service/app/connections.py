"""The service's HTTP protocol: uvicorn's h11 protocol with the connection limits it lacks.

uvicorn closes an idle keep-alive connection after a response, but not a connection that never
sends a request, or sends only part of its headers: 20,000 such connections held the service at
its file-descriptor limit (and uvicorn's default parser, httptools, took a 2 MB header). Here:

- a connection must complete its request headers within `header_timeout` seconds of opening (or of
  the previous response); otherwise it is closed;
- a request body must be complete within `body_timeout` seconds of its request head, however its
  bytes come (2,100 connections that sent headers and 16 bytes of a body were held for 78 s, and
  every valid request meanwhile got a 503; a body dripped a byte every 5 s was held forever while
  the deadline restarted at each byte);
- one client address may hold at most `max_connections_per_client` connections of a worker (0:
  no bound; behind a proxy every client has the proxy's address): more are closed at once;
- the request head (target + headers) may be at most `max_header_bytes`: a larger one is answered
  400 and closed, whether it arrived in pieces (h11's incomplete-event limit) or at once (checked
  on the parsed request); this also bounds the number of headers;
- uvicorn's `limit_concurrency` bounds the connections and tasks of an HTTP worker (503 beyond).

It extends uvicorn's H11Protocol and reads its internals (`cycle.more_body`,
`cycle.response_complete`, `flow.read_paused`, `conn.next_event`): the project pins the uvicorn
release its tests cover (pyproject.toml), and
`tests/test_reliability.py::test_the_uvicorn_internals_the_limits_read_are_there` fails, naming
each one, when a release moves them.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_per_client: dict[str, int] = {}  # this worker's open connections by client address


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a deadline for request headers (`config.header_timeout`, seconds), one for
    each whole request body (`config.body_timeout`) and a bound on connections per client address
    (`config.max_connections_per_client`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) and peer else None
        if self._client is not None:
            _per_client[self._client] = _per_client.get(self._client, 0) + 1
            bound = getattr(self.config, "max_connections_per_client", 0)
            if bound and _per_client[self._client] > bound:
                transport.close()
                return
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
            self._body_wait(self.cycle.more_body, restart=False)  # one deadline for the whole body
        elif self._header_deadline is None:  # bytes of a next request began after a response
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # uvicorn's keep-alive timer takes over until the next bytes arrive
        self._body_wait(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._body_wait(False)
        if getattr(self, "_client", None) is not None:
            left = _per_client.get(self._client, 1) - 1
            if left > 0:
                _per_client[self._client] = left
            else:
                _per_client.pop(self._client, None)
            self._client = None
        super().connection_lost(exc)

    def _body_wait(self, more: bool, restart: bool = True) -> None:
        """Start the body's deadline while more of it is to come (keep a running one unless
        `restart`), else stop it."""
        running = getattr(self, "_body_deadline", None) is not None
        if more and running and not restart:
            return
        if running:
            self._body_deadline.cancel()
            self._body_deadline = None
        timeout = getattr(self.config, "body_timeout", None)
        if more and timeout:
            self._body_deadline = self.loop.call_later(timeout, self._body_too_late)

    def _body_too_late(self) -> None:
        self._body_deadline = None
        if self.cycle is None or not self.cycle.more_body or self.transport.is_closing():
            return
        if self.flow.read_paused:  # we stopped reading (the app has not taken the bytes): not the client's stall
            self._body_wait(True)  # another full period
            return
        self.transport.close()  # the app's receive() gets http.disconnect: its request ends

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
