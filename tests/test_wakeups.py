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


async def test_a_wait_for_the_end_sleeps_through_the_engines_steps_and_wakes_at_its_end(
        pair: tuple[SQLiteStore, SQLiteStore]) -> None:
    """A sync request waits for the end only: the steps relayed from the engine do not make it read the
    job (at every step, for every waiting request), the completion wakes it at once."""
    api, engine = pair
    job = await api.submit(NewJob(model="kolors", params=params()))
    lease = await engine.claim("w", 30, 1)
    assert lease is not None and lease.job.id == job.id
    reads: list[str] = []
    get = api.get

    async def counted(job_id: str) -> object:
        reads.append(job_id)
        return await get(job_id)

    api.get = counted  # type: ignore[method-assign, assignment]  # the same store, its reads counted
    seen = lease.job.version
    for_the_end = asyncio.create_task(api.wait(job.id, seen, LONG, done=True))
    for_any_change = asyncio.create_task(api.wait(job.id, seen, LONG))
    await asyncio.sleep(0.05)
    assert len(reads) == 2 and not for_the_end.done() and not for_any_change.done()
    for step in range(1, 5):
        assert await engine.progress(lease, step, 4)
    stepped = await asyncio.wait_for(for_any_change, WOKEN)  # an event stream is woken by a step
    assert stepped is not None and stepped.step >= 1
    await asyncio.sleep(0.1)
    assert not for_the_end.done() and reads.count(job.id) == 3, reads  # no read for the sync waiter's sake
    assert await engine.complete(lease, [b"RIFF-not-an-image"], "webp", [1], {})
    ended = await asyncio.wait_for(for_the_end, WOKEN)
    assert ended is not None and ended.state.terminal and reads.count(job.id) == 4
