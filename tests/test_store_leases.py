"""The store suite, on both backends, for what a lost worker leaves behind and what a running job says:
a job whose lease ran out reads QUEUED again at once, on every replica, with its queue position and its
next attempt, and its lost worker is fenced; a running job's phase after denoising."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kolors_api.jobs import JobState, JobStore, NewJob, ProgressReport
from tests.conftest import REDIS_URL
from tests.test_store import drop, make, params


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await make(request.param, tmp_path)
    yield s
    await drop(s)


async def replica_of(store: JobStore) -> JobStore:
    """Another process's view of `store`: a second store on the same database (another API replica)."""
    if hasattr(store, "keys"):
        from kolors_api.jobs.redis import RedisStore

        other: JobStore = RedisStore(REDIS_URL, prefix=store.keys.prefix)
    else:
        from kolors_api.jobs.sqlite import SQLiteStore

        other = SQLiteStore(store.path)  # type: ignore[attr-defined]
    await other.open()
    return other


async def test_a_job_whose_lease_ran_out_reads_queued_at_once_with_its_position_and_attempt(
        store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params(1)))
    behind = await store.submit(NewJob(model="kolors", params=params(2)))
    lease = await store.claim("w1", 0.3, 0.1)
    assert lease is not None and lease.job.id == job.id
    assert await store.progress(lease, 2, 50)
    running = await store.get(job.id)
    assert running is not None and (running.state, running.step, running.attempt) == (JobState.PROCESSING, 2, 1)
    assert running.phase == "denoising"
    replica = await replica_of(store)
    try:
        await asyncio.sleep(0.4)  # the worker died: no heartbeat, no claim by anyone
        for reader in (store, replica):
            got = await reader.get(job.id)
            assert got is not None and (got.state, got.step, got.attempt) == (JobState.QUEUED, 0, 2)
            assert await reader.queue_position(job.id) == 0  # served first by the next claim
            assert await reader.queue_position(behind.id) == 1
        # the lost worker's late writes change nothing: the job is no longer its own
        assert not await store.progress(lease, 3, 50)
        assert not await store.heartbeat(lease, 30)
        assert not await store.complete(lease, [b"late"], "png", [1], {})
        fresh = await replica.claim("w2", 30, 1)
        assert fresh is not None and fresh.job.id == job.id and fresh.delivery == 2
        again = await store.get(job.id)
        assert again is not None and (again.state, again.attempt) == (JobState.PROCESSING, 2)
        assert await store.queue_position(behind.id) == 0
    finally:
        await replica.close()


async def test_progress_says_the_phase_after_denoising(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    assert await store.progress(lease, 1, 2)
    got = await store.get(job.id)
    assert got is not None and (got.step, got.phase) == (1, "denoising")
    for phase in ("decoding", "encoding", "storing"):
        assert (await store.progress_many([ProgressReport(lease, 2, 2, None, phase)]))[0].held
        got = await store.get(job.id)
        assert got is not None and (got.step, got.total_steps, got.phase) == (2, 2, phase)
    assert await store.complete(lease, [b"x"], "png", [1], {})
