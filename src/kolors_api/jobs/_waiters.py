"""The tasks blocked in `JobStore.wait`, by job id: one registry for both backends.

A backend calls `notify(job_id)` whenever it learns that a job changed (SQLite: after its own
writes; Redis: on a pub/sub message). Waiters also re-read the job every `recheck` seconds, so a
change made by another process that sent no notification is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from kolors_api.jobs.base import Job


class Waiters:
    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._events

    def notify(self, job_id: str) -> None:
        for ev in self._events.get(job_id, ()):
            ev.set()

    async def wait(self, get: Callable[[str], Awaitable[Job | None]], job_id: str, after_version: int,
                   timeout: float, recheck: float) -> Job | None:
        """`JobStore.wait` on top of the backend's `get`."""
        deadline = time.monotonic() + timeout
        ev = asyncio.Event()
        self._events.setdefault(job_id, set()).add(ev)
        try:
            while True:
                ev.clear()  # before reading, so a change notified meanwhile still wakes us
                job = await get(job_id)
                left = deadline - time.monotonic()
                if job is None or job.version > after_version or left <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(left, recheck))
        finally:
            waiters = self._events.get(job_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._events[job_id]
