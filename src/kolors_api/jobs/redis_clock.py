"""The Redis server's clock, the one clock of the fleet, as one process reads it.

The scripts of the Redis store write and compare timestamps (lease deadlines, `created_at`,
retention) on the server's clock. Reading it inside every script (TIME) costs a command each; instead
each store reads it once every `SYNC_SECONDS` (one TIME round trip, its offset from this process's
monotonic clock taken at the middle of the trip) and hands every script the time it started at.
Between two processes the error is half a round trip plus the drift of their clocks over
`SYNC_SECONDS` (micro- to milliseconds: leases last seconds), and a jump of the server's clock is
followed within `SYNC_SECONDS`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis


class ServerClock:
    """`now(redis)`: the server's time in seconds, read through this process's monotonic clock."""

    #: How often the offset is measured again, in seconds.
    SYNC_SECONDS = 10.0

    def __init__(self) -> None:
        self._offset: float | None = None
        self._synced = 0.0
        self._lock: asyncio.Lock | None = None

    async def now(self, r: Redis) -> float:
        if self._offset is None or time.monotonic() - self._synced > self.SYNC_SECONDS:
            await self._sync(r)
        assert self._offset is not None
        return time.monotonic() + self._offset

    async def _sync(self, r: Redis) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # callers that find it stale together share one round trip
            if self._offset is not None and time.monotonic() - self._synced <= self.SYNC_SECONDS:
                return
            sent = time.monotonic()
            seconds, micros = await r.time()
            back = time.monotonic()
            self._offset = seconds + micros / 1e6 - (sent + back) / 2
            self._synced = back

    def forget(self) -> None:
        """Measure again at the next read (after a reconnect: the server may be another machine)."""
        self._offset = None
