"""The SQLite store's database thread works in turns (`SQLiteStore._turn`): work that comes from the
event loop while a turn takes the waiting lists is never lost, however the threads interleave."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kolors_api.jobs.base import NewJob
from kolors_api.jobs.sqlite import SQLiteStore

#: Operations the test runs: with the GIL changing hands every 2 µs, the code before the fix
#: (which read the list to add to before it took the lock) lost a turn and hung in each of
#: six runs (at 2 and 5 µs), within 4-8 s.
OPERATIONS = 40_000


@pytest.fixture
def switch_often() -> Iterator[None]:
    """The GIL changes hands every 2 µs, not every 5 ms: interleavings that are rare under load (the
    loop between two steps while a turn takes the waiting lists) come by the thousand."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(2e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


async def test_calls_and_submits_racing_the_turns_are_each_answered(tmp_path: Path, switch_often: None) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    done = submitted = 0

    async def client(i: int) -> None:
        nonlocal done, submitted
        while done < OPERATIONS:
            if i % 2:
                await store.submit(NewJob(model="kolors", params={"prompt": "p", "seeds": [i]}))
                submitted += 1
            else:
                assert await store.get("no-such-job") is None
            done += 1

    try:
        clients = asyncio.gather(*(client(i) for i in range(32)))
        seen = -1
        while not clients.done():
            # every operation takes well under a millisecond: two seconds without one is a lost turn
            assert done != seen, f"no answer in 2 s after {done} operations (a turn was lost)"
            seen = done
            await asyncio.wait([clients], timeout=2)
        await clients
        assert (await store.stats()).queued == submitted
    finally:
        if not clients.done():
            clients.cancel()
        await store.close()
