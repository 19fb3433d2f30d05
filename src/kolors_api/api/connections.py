"""Slow clients cannot take the server down: uvicorn's HTTP protocol with read deadlines and a cap.

uvicorn reads a request's headers and body for as long as a client cares to trickle them, and takes
every connection it is offered until the process runs out of file descriptors; a few hundred sockets
that send a header line now and then then starve `/healthz` and every real client. `serve` runs
uvicorn with `protocol(settings)` instead of its own HTTP protocol, which adds:

- **a header deadline**: a connection that has not sent a whole request head within
  `header_timeout_seconds` of connecting (or, kept alive, of its next request's first byte) is closed;
- **a body deadline**: a request whose body has not fully arrived `body_timeout_seconds` after its
  head is cut off (the app sees a disconnect);
- **a connection cap**, `max_connections` (at most the file-descriptor limit less a reserve for the
  store, logs and outgoing webhooks; `serve` raises its soft limit to the hard one first). A new
  connection beyond the cap evicts the connection that has waited longest for its own head or body:
  a client that sends its request at once (a health check, an authenticated API call) is never the
  one evicted, and a request being answered (a sync wait, an event stream) is never cut. When every
  connection is busy being answered, the new one is closed.

Behind a reverse proxy, give the proxy the same limits (deploy/README.md has an nginx configuration).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kolors_api.settings import Settings

log = logging.getLogger("kolors_api.api")

#: File descriptors kept for what is not a client connection: the store, log files, outgoing webhook
#: and blob-store connections.
FD_RESERVE = 128
#: Phases of a connection: waiting for a request head, for a body, or being answered.
HEADERS, BODY, ANSWERING = "headers", "body", "answering"


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """`max_connections`, at most what the file-descriptor limit leaves for clients."""
    return max(16, min(settings.max_connections, fd_limit - FD_RESERVE))


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header and body deadlines and the connection cap."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = HEADERS
        self.phase_since = 0.0
        self.deadline: asyncio.TimerHandle | None = None

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self.phase, self.phase_since = phase, self.loop.time()
        self.deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEADERS, self.header_timeout)
        if len(self.connections) > self.max_connections:
            self._evict()

    def _evict(self) -> None:
        """Close the connection that has waited longest for its head or body (else this new one)."""
        waiting = [c for c in self.connections if isinstance(c, GuardedHttp) and c.phase != ANSWERING
                   and c is not self and not c.transport.is_closing()]
        victim = min(waiting, key=lambda c: c.phase_since) if waiting else self
        victim._disarm()
        victim.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm(HEADERS, self.header_timeout)  # the next request on a kept-alive connection

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # kept alive and idle (uvicorn's keep-alive timeout closes it): evictable again
        self.phase, self.phase_since = HEADERS, self.loop.time()

    def on_headers_complete(self) -> None:
        self._arm(BODY, self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self.phase, self.phase_since = ANSWERING, self.loop.time()
        super().on_message_complete()


def protocol(settings: Settings, fd_limit: int) -> type[GuardedHttp]:
    """The HTTP protocol class `serve` gives uvicorn (`uvicorn.Config(http=...)`), with its limits."""
    return type("GuardedHttp", (GuardedHttp,), {
        "header_timeout": settings.header_timeout_seconds, "body_timeout": settings.body_timeout_seconds,
        "max_connections": connection_cap(settings, fd_limit)})


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """The options `serve` adds to `uvicorn.Config`: the guarded protocol and a listen backlog."""
    fd_limit = raise_fd_limit()
    return {"http": protocol(settings, fd_limit), "backlog": 2048}
