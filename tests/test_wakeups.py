"""Wake-ups between the processes of one machine on one SQLite store (`serve` and its engine
processes): what one store writes, the other hears through `relay` → `changed`, with no polling.
Two store objects on one database file stand for the two processes (the socket between them is
`kolors_api.worker.messages`, covered live by tests/test_engine_process.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kolors_api.jobs import NewJob
from kolors_api.jobs.sqlite import SQLiteStore
from tests.test_store import params

#: Longer than any fallback re-check: a wait that ends sooner was woken, not timed out.
LONG = 30.0
#: Shorter than the store's fallback re-check of a claim or a job (1 s): an answer within it was woken.
WOKEN = 0.6


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    api, engine = SQLiteStore(tmp_path / "db.sqlite3"), SQLiteStore(tmp_path / "db.sqlite3")
    await api.open()
    await engine.open()
    api.relay(engine.changed)
    engine.relay(api.changed)
    yield api, engine
    await api.close()
    await engine.close()


async def test_a_submit_wakes_the_engine_waiting_for_work_and_a_claim_in_progress(
        pair: tuple[SQLiteStore, SQLiteStore]) -> None:
    api, engine = pair
    waiting = asyncio.create_task(engine.wait_for_work(LONG))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await api.submit(NewJob(model="kolors", params=params()))
    await asyncio.wait_for(waiting, 5)
    assert await engine.claim("w", 30, 0) is not None  # the queue is empty again
    claiming = asyncio.create_task(engine.claim("w", 30, LONG))
    await asyncio.sleep(0.05)
    assert not claiming.done()
    job = await api.submit(NewJob(model="kolors", params=params(1)))
    lease = await asyncio.wait_for(claiming, WOKEN)
    assert lease is not None and lease.job.id == job.id


async def test_the_engines_progress_wakes_the_api_waiting_on_that_job(pair: tuple[SQLiteStore, SQLiteStore]) -> None:
    api, engine = pair
    job = await api.submit(NewJob(model="kolors", params=params()))
    lease = await engine.claim("w", 30, 1)
    assert lease is not None and lease.job.id == job.id
    seen = (await api.get(job.id)).version  # type: ignore[union-attr]
    waiting = asyncio.create_task(api.wait(job.id, seen, LONG))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await engine.progress(lease, 1, 4)
    changed = await asyncio.wait_for(waiting, WOKEN)
    assert changed is not None and changed.step == 1


async def test_without_the_relay_nothing_is_heard_until_the_wait_ends(tmp_path: Path) -> None:
    api, engine = SQLiteStore(tmp_path / "db.sqlite3"), SQLiteStore(tmp_path / "db.sqlite3")
    await api.open()
    await engine.open()
    try:
        waiting = asyncio.create_task(engine.wait_for_work(0.5))
        await api.submit(NewJob(model="kolors", params=params()))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the other store's submit did not reach this one
        await waiting
    finally:
        await api.close()
        await engine.close()
