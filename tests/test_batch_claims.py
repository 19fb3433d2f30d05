"""Batch claims (`claim_batch`), in the shared store suite: every backend runs these tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kolors_api.jobs import JobState, JobStore, NewJob
from kolors_api.jobs.batching import BatchBuilder, BatchLimits
from tests.test_store import STORES, drop, on_every_blob_store, open_store


@pytest.fixture(params=STORES)  # queue cases: the two stores; image cases marked
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await open_store(request, tmp_path)
    yield s
    await drop(s)


def params(seed: int = 1, *, width: int = 512, steps: int = 2, images: int = 1, **extra: Any) -> dict[str, Any]:
    return {"prompt": f"a fox {seed}", "negative_prompt": "", "seed": seed, "steps": steps, "width": width,
            "height": 512, "cfg": 5.0, "scheduler": "EulerDiscreteScheduler", "number_of_images": images,
            "output_format": "png", "output_quality": 90, **extra}


async def submit(store: JobStore, **kw: Any) -> str:
    return (await store.submit(NewJob(model="kolors", params=params(**kw)))).id


async def test_a_batch_takes_the_oldest_queued_jobs_of_the_heads_shape_only(store: JobStore) -> None:
    head = await submit(store, seed=1)
    other_width = await submit(store, seed=2, width=768)
    same = await submit(store, seed=3, images=2)  # prompts, seeds, image counts and formats may differ
    other_steps = await submit(store, seed=4, steps=3)
    other_cfg = await submit(store, seed=5, cfg=2.0)
    other_scheduler = await submit(store, seed=6, scheduler="UniPCMultistepScheduler")
    same_again = await submit(store, seed=7, output_format="jpg")
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and lease.job.id == head
    batch = BatchBuilder(BatchLimits(max_images=8), lease.job.params)
    got = await store.claim_batch("w1", 30, batch)
    assert [g.job.id for g in got] == [same, same_again]
    assert batch.images == 4
    for g in got:
        assert g.job.state == JobState.PROCESSING and g.delivery == 1 and g.token != lease.token
    # the others wait in their order; the next claim takes the oldest of them
    for job_id in (other_width, other_steps, other_cfg, other_scheduler):
        job = await store.get(job_id)
        assert job is not None and job.state == JobState.QUEUED
    assert await store.queue_position(other_width) == 0
    nxt = await store.claim("w1", 30, 0.1)
    assert nxt is not None and nxt.job.id == other_width


async def test_a_batch_keeps_within_its_image_and_pixel_budgets(store: JobStore) -> None:
    await submit(store, seed=1, images=2)
    three = await submit(store, seed=2, images=3)
    one = await submit(store, seed=3)
    also = await submit(store, seed=4, images=2)
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    # 4 images: the 3-image job does not fit beside the head's 2, the 1-image job does, then it is full
    batch = BatchBuilder(BatchLimits(max_images=4), lease.job.params)
    assert [g.job.id for g in await store.claim_batch("w1", 30, batch)] == [one]
    assert batch.images == 3
    # pixels: 512² each; a budget of three images' worth takes one more image only
    lease2 = await store.claim("w1", 30, 0.1)
    assert lease2 is not None and lease2.job.id == three
    batch2 = BatchBuilder(BatchLimits(max_images=16, max_pixels=4 * 512 * 512), lease2.job.params)
    assert await store.claim_batch("w1", 30, batch2) == []  # `also` has two images: 5 > 4
    assert batch2.images == 3
    lease3 = await store.claim("w1", 30, 0.1)
    assert lease3 is not None and lease3.job.id == also


@on_every_blob_store
async def test_every_job_of_a_batch_keeps_its_own_lease_and_outcome(store: JobStore) -> None:
    ids = [await submit(store, seed=i) for i in range(3)]
    head = await store.claim("w1", 30, 0.1)
    assert head is not None
    rest = await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=8), head.job.params))
    a, b = rest
    assert await store.progress(a, 1, 2) and await store.heartbeat(b, 30)
    assert await store.complete(head, [b"h"], "png", [0], {})
    assert await store.fail(a, "cancelled")
    assert not await store.complete(a, [b"late"], "png", [1], {})  # fenced: its outcome is stored
    assert await store.complete(b, [b"b"], "png", [2], {})
    states = [(await store.get(i)) for i in ids]
    assert [s.state for s in states if s] == [JobState.COMPLETED, JobState.FAILED, JobState.COMPLETED]
    assert await store.read_output(ids[2], 0) == b"b"


@on_every_blob_store
async def test_a_batch_claimed_job_whose_worker_died_is_delivered_again(store: JobStore) -> None:
    head_id = await submit(store, seed=1)
    extra_id = await submit(store, seed=2)
    head = await store.claim("w1", 0.3, 0.1)
    assert head is not None and head.job.id == head_id
    extra = await store.claim_batch("w1", 0.3, BatchBuilder(BatchLimits(max_images=8), head.job.params))
    assert [e.job.id for e in extra] == [extra_id]
    # while the leases run, another worker gets nothing (Redis: it reads the extra job's entry and
    # hands it to its holder)
    assert await store.claim("w2", 30, 0.1) is None
    await asyncio.sleep(0.4)  # w1 died: both leases ran out
    again = []
    for _ in range(2):
        lease = await store.claim("w2", 30, 2)
        assert lease is not None
        again.append(lease)
    assert sorted(lease.job.id for lease in again) == sorted([head_id, extra_id])
    assert all(lease.delivery == 2 for lease in again)
    assert not await store.complete(extra[0], [b"stale"], "png", [2], {})
    for lease in again:
        assert await store.complete(lease, [b"ok"], "png", [0], {})


async def test_a_batch_claimed_job_kept_alive_by_heartbeats_is_not_taken_by_others(store: JobStore) -> None:
    await submit(store, seed=1)
    extra_id = await submit(store, seed=2)
    head = await store.claim("w1", 0.5, 0.1)
    assert head is not None
    (extra,) = await store.claim_batch("w1", 0.5, BatchBuilder(BatchLimits(max_images=8), head.job.params))
    for _ in range(4):
        await asyncio.sleep(0.25)
        assert await store.heartbeat(head, 0.5) and await store.heartbeat(extra, 0.5)
        assert await store.claim("w2", 0.5, 0.05) is None
    assert await store.complete(extra, [b"x"], "png", [2], {})
    job = await store.get(extra_id)
    assert job is not None and job.state == JobState.COMPLETED and job.deliveries == 1


async def test_a_cancelled_queued_job_is_not_claimed_into_a_batch(store: JobStore) -> None:
    await submit(store, seed=1)
    cancelled = await submit(store, seed=2)
    kept = await submit(store, seed=3)
    await store.request_cancel(cancelled)
    head = await store.claim("w1", 30, 0.1)
    assert head is not None
    got = await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=8), head.job.params))
    assert [g.job.id for g in got] == [kept]


async def test_jobs_taken_into_a_batch_put_their_start_webhook_in_the_outbox(store: JobStore) -> None:
    hooked = {"webhook": "http://127.0.0.1:9/hook", "webhook_events": ("start",)}
    ids = [(await store.submit(NewJob(model="kolors", params=params(seed=i), **hooked))).id  # type: ignore[arg-type]
           for i in range(3)]
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    got = await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=8), lease.job.params))
    assert {lease.job.id, *(g.job.id for g in got)} == set(ids)
    assert sorted(d.job_id for d in await store.claim_webhooks(30, 10)) == sorted(ids)


async def test_progress_of_a_call_is_one_answer_per_job_with_its_cancel_flag_and_watchers(store: JobStore) -> None:
    from kolors_api.jobs import Lease, ProgressReport

    ids = [await submit(store, seed=n) for n in range(3)]
    head = await store.claim("w1", 30, 0.1)
    assert head is not None
    leases = [head, *await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=8), head.job.params))]
    assert [lease.job.id for lease in leases] == ids
    await store.request_cancel(ids[1])
    await store.watch_previews(ids[2], 60)
    stale = Lease(job=leases[0].job, token="not-the-lease", worker_id="w2", delivery=1)
    acks = await store.progress_many([ProgressReport(leases[0], 1, 2), ProgressReport(leases[1], 1, 2),
                                      ProgressReport(leases[2], 1, 2, b"webp"), ProgressReport(stale, 2, 2)])
    assert [(a.held, a.cancel_requested, a.previews_watched) for a in acks] == [
        (True, False, False), (True, True, False), (True, False, True), (False, False, False)]
    jobs = [await store.get(job_id) for job_id in ids]
    assert [job.step if job else None for job in jobs] == [1, 1, 1]  # the stale report stored nothing
    assert await store.read_preview(ids[2]) == (1, b"webp")
    # a watch runs out
    await store.watch_previews(ids[0], 0.05)
    await asyncio.sleep(0.2)
    assert not (await store.progress_many([ProgressReport(leases[0], 2, 2)]))[0].previews_watched


async def test_a_progress_answer_says_whether_someone_follows_the_job(store: JobStore) -> None:
    """`ProgressAck.followed`: on Redis, while someone waits on the job's changes (`wait`: an event
    stream, a sync request) or its webhook delivers progress; the SQLite store cannot tell: always."""
    from kolors_api.jobs import ProgressReport
    from kolors_api.jobs.redis import RedisStore

    plain = await submit(store, seed=1)
    hooked = (await store.submit(NewJob(model="kolors", params=params(seed=2),
                                        webhook="https://hooks.example/k", webhook_events=("progress",)))).id
    ended = (await store.submit(NewJob(model="kolors", params=params(seed=3),
                                       webhook="https://hooks.example/k", webhook_events=("completed",)))).id
    leases = {}
    for _ in range(3):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None
        leases[lease.job.id] = lease

    async def followed(job_id: str) -> bool:
        return (await store.progress_many([ProgressReport(leases[job_id], 1, 2)]))[0].followed

    told = isinstance(store, RedisStore)
    assert [await followed(job_id) for job_id in (plain, hooked, ended)] == [not told, True, not told]
    waiting = asyncio.create_task(store.wait(plain, 10**6, 5))
    for _ in range(100):
        if await followed(plain):
            break
        await asyncio.sleep(0.02)
    assert await followed(plain)
    waiting.cancel()
