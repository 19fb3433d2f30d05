"""A job's server-sent events for `AsyncJob.events()` and `AsyncioJob.events()`: the parsed
`Event`, the text/event-stream parser, and the reconnect rule both share.

A stream that drops before its terminal event (the connection breaks, the server restarts, the
store had an outage) is reopened with ``Last-Event-ID``: the server then sends what changed since
that event (at least the latest progress, and always the terminal event), so nothing that
matters is missed. After `MAX_RECONNECTS` failed tries in a row the last error is raised.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import httpx

from kolors_api.client._exceptions import APIError, KolorsAPIError

#: The events that end a stream.
TERMINAL_EVENTS = ("completed", "failed")
#: Tries in a row to reopen a dropped stream before giving up; the n-th waits n × RECONNECT_DELAY_S.
MAX_RECONNECTS = 5
RECONNECT_DELAY_S = 0.5
#: HTTP statuses after which a dropped stream is reopened (the store or a replica was away).
RETRIED_STATUSES = (502, 503, 504)
#: Read timeout of a stream: the server sends a keep-alive comment every 15 s on an idle one.
STREAM_READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Event:
    """One event of a job: `event` is queued, started, progress, completed or failed; `data` is its
    JSON body (`completed` carries the result body, as `AsyncJob.result()` returns it).

    Example::

        for event in job.events(previews=True):
            if event.event == "progress":
                print(event.data["step"], "/", event.data["total_steps"])
                if event.preview is not None:
                    open("preview.webp", "wb").write(event.preview)
    """

    event: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    @property
    def preview(self) -> bytes | None:
        """The preview image (webp bytes) of a progress event asked for with `previews=True`, if any."""
        url = self.data.get("preview")
        if not isinstance(url, str) or ";base64," not in url:
            return None
        return base64.b64decode(url.partition(";base64,")[2])


class EventParser:
    """Lines of a text/event-stream in (without their line ends), `Event`s out; comments dropped."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._name = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None

    def _dispatch(self) -> Event | None:
        name, data, self._name, self._data = self._name or "message", self._data, "", []
        if not data:
            return None
        try:
            body = json.loads("\n".join(data))
        except ValueError:
            body = {"data": "\n".join(data)}
        return Event(name, body if isinstance(body, dict) else {"data": body}, self.last_id)


class Follow:
    """One `events()` call: where the stream is (for Last-Event-ID) and the reconnect rule."""

    def __init__(self, request_id: str, response_url: str, previews: bool, timeout: float) -> None:
        self.request_id = request_id
        self.url = f"{response_url}/events" + ("?previews=1" if previews else "")
        self.timeout = httpx.Timeout(timeout, read=max(timeout, STREAM_READ_TIMEOUT_S))
        self.parser = EventParser()
        self.failures = 0

    @property
    def headers(self) -> dict[str, str]:
        last = self.parser.last_id
        return {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}

    def feed(self, line: str) -> Event | None:
        event = self.parser.feed(line)
        if event is not None:
            self.failures = 0
        return event

    def retry_after(self, error: Exception | None) -> float:
        """Seconds to wait before reopening a stream that broke with `error` (None: it ended before
        its terminal event); raises instead when it is not to be retried, or was tried enough."""
        if isinstance(error, APIError) and error.status not in RETRIED_STATUSES:
            raise error
        self.failures += 1
        if self.failures > MAX_RECONNECTS:
            raise error or KolorsAPIError(0, f"the event stream of {self.request_id} keeps ending early")
        return RECONNECT_DELAY_S * self.failures
