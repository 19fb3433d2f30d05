"""The tasks blocked in `JobStore.wait`, by job id: one registry for both backends.

A backend calls `notify(job_id)` whenever it learns that a job changed (SQLite: after its own
writes; Redis: on a pub/sub message), saying when it knows the change was only progress: a waiter
for the job's end (a sync request) then sleeps on instead of reading the job at every step.
Waiters also re-read the job every `recheck` seconds, so a change made by another process that
sent no notification is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from kolors_api.jobs.base import Job


class Waiters:
    def __init__(self) -> None:
        self._events: dict[str, dict[asyncio.Event, bool]] = {}  # job id -> {event: waits for the end}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._events

    def notify(self, job_id: str, progress: bool = False) -> None:
        """Wake the waiters of `job_id`; a `progress` change (the job runs on) not those for its end."""
        for ev, done in self._events.get(job_id, {}).items():
            if not (progress and done):
                ev.set()

    async def wait(self, get: Callable[[str], Awaitable[Job | None]], job_id: str, after_version: int,
                   timeout: float, recheck: float, *, done: bool = False) -> Job | None:
        """`JobStore.wait` on top of the backend's `get`."""
        deadline = time.monotonic() + timeout
        ev = asyncio.Event()
        self._events.setdefault(job_id, {})[ev] = done
        try:
            while True:
                ev.clear()  # before reading, so a change notified meanwhile still wakes us
                job = await get(job_id)
                left = deadline - time.monotonic()
                if job is None or left <= 0 or (job.state.terminal if done else job.version > after_version):
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(left, recheck))
        finally:
            waiters = self._events.get(job_id)
            if waiters is not None:
                waiters.pop(ev, None)
                if not waiters:
                    del self._events[job_id]
