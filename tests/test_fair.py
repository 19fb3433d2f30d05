"""Weighted fair queuing across keys (`kolors_api.jobs.fair`), in the shared store suite: every backend
runs these tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kolors_api.jobs import ApiKey, JobStore, NewJob, make_key_record, new_key
from kolors_api.jobs.base import destination
from kolors_api.jobs.batching import BatchBuilder, BatchLimits
from kolors_api.jobs.fair import work
from tests.store_helpers import CHANGES, READS
from tests.test_store import STORES, drop, open_store


@pytest.fixture(params=STORES)  # queue cases: the two stores
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await open_store(request, tmp_path)
    yield s
    await drop(s)


def unwatched(store: JobStore) -> JobStore:
    """The store without its StateWatch (which re-reads every job after each change): for long queues."""
    for name in CHANGES + READS:
        vars(store).pop(name, None)
    return store


def params(seed: int = 1, steps: int = 2) -> dict[str, Any]:
    return {"prompt": f"a fox {seed}", "negative_prompt": "", "seed": seed, "steps": steps, "width": 512,
            "height": 512, "cfg": 5.0, "scheduler": "EulerDiscreteScheduler", "number_of_images": 1,
            "output_format": "png", "output_quality": 90}


async def key(store: JobStore, name: str, weight: float = 1.0) -> ApiKey:
    record = make_key_record(name, new_key(), weight=weight)
    await store.add_key(record)
    return record


async def submit(store: JobStore, owner: ApiKey | None, seed: int = 1, steps: int = 2) -> str:
    return (await store.submit(NewJob(model="kolors", params=params(seed, steps),
                                      key_id=owner.id if owner else None))).id


async def test_a_lone_keys_job_goes_next_past_another_keys_backlog(store: JobStore) -> None:
    unwatched(store)
    flood, lone = await key(store, "flood"), await key(store, "lone")
    for i in range(200):
        await submit(store, flood, i)
    first = await store.claim("w1", 30, 0.1)
    assert first is not None and first.job.key_id == flood.id
    mine = await submit(store, lone, 999)
    assert await store.queue_position(mine) == 0
    nxt = await store.claim("w1", 30, 0.1)
    assert nxt is not None and nxt.job.id == mine
    # and so it heads the next engine call; a batch fills with the flood's jobs behind it
    extra = await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=4), nxt.job.params))
    assert [e.job.key_id for e in extra] == [flood.id] * 3


async def test_backlogged_keys_are_served_work_in_proportion_to_their_weights(store: JobStore) -> None:
    unwatched(store)
    heavy, light = await key(store, "heavy", weight=3), await key(store, "light", weight=1)
    for i in range(120):
        await submit(store, heavy, i, steps=2)
        await submit(store, light, i, steps=4)  # each of its jobs is twice the work
    served: Counter[str] = Counter()
    for _ in range(100):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and lease.job.key_id is not None
        served[lease.job.key_id] += work(lease.job.params)
    ratio = served[heavy.id] / served[light.id]
    assert 3 * 0.9 <= ratio <= 3 * 1.1, served


async def test_an_idle_key_banks_no_credit(store: JobStore) -> None:
    unwatched(store)
    busy, idle = await key(store, "busy"), await key(store, "idle")
    await submit(store, idle, 0)
    for i in range(60):
        await submit(store, busy, i)
    for _ in range(41):  # the idle key's one job and 40 of the busy key's, while it has nothing queued
        assert await store.claim("w1", 30, 0.1) is not None
    for i in range(10):
        await submit(store, idle, 100 + i)
    owners = []
    for _ in range(10):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None
        owners.append(lease.job.key_id)
    # shared from now on, not ten in a row for the key that was away
    assert 4 <= owners.count(idle.id) <= 6, owners


async def test_a_batch_fills_in_fair_order_across_keys(store: JobStore) -> None:
    a, b = await key(store, "a"), await key(store, "b")
    for i in range(6):
        await submit(store, a, i)
    for i in range(6):
        await submit(store, b, 10 + i)
    head = await store.claim("w1", 30, 0.1)
    assert head is not None
    extra = await store.claim_batch("w1", 30, BatchBuilder(BatchLimits(max_images=4), head.job.params))
    owners = Counter([head.job.key_id, *(e.job.key_id for e in extra)])
    assert owners == {a.id: 2, b.id: 2}


async def test_queue_positions_follow_the_fair_order(store: JobStore) -> None:
    a, b = await key(store, "a"), await key(store, "b")
    a_jobs = [await submit(store, a, i) for i in range(5)]
    first = await store.claim("w1", 30, 0.1)
    assert first is not None and first.job.id == a_jobs[0]
    b_jobs = [await submit(store, b, 10 + i) for i in range(2)]
    cancelled = a_jobs[1]
    await store.request_cancel(cancelled)
    waiting = a_jobs[2:] + b_jobs
    positions = {job_id: await store.queue_position(job_id) for job_id in waiting}
    assert sorted(positions.values()) == list(range(len(waiting)))
    assert await store.queue_position(cancelled) is None and await store.queue_position(a_jobs[0]) is None
    order = []
    for _ in waiting:
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None
        order.append(lease.job.id)
    assert order == sorted(waiting, key=lambda job_id: positions[job_id])
    assert order[0] == b_jobs[0]  # the new key first, then turn about
    assert await store.claim("w1", 30, 0.05) is None


async def test_jobs_without_a_key_share_the_queue_as_one_key(store: JobStore) -> None:
    a = await key(store, "a")
    anonymous = [await submit(store, None, i) for i in range(3)]
    keyed = [await submit(store, a, 10 + i) for i in range(3)]
    got = []
    for _ in range(6):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None
        got.append(lease.job.id)
    assert [j for j in got if j in anonymous] == anonymous and [j for j in got if j in keyed] == keyed
    assert got[0] in (anonymous[0], keyed[0]) and {got[0], got[1]} == {anonymous[0], keyed[0]}


async def test_a_keys_weight_is_stored_and_can_change(store: JobStore) -> None:
    record = await key(store, "w", weight=2.5)
    got = await store.get_key(record.id)
    assert got is not None and got.weight == 2.5 and got.public()["weight"] == 2.5
    updated = await store.update_key(record.id, weight=4.0)
    assert updated is not None and updated.weight == 4.0
    assert [k.weight for k in await store.list_keys()] == [4.0]
    plain = await key(store, "plain")
    assert (await store.get_key(plain.id)).weight == 1.0  # type: ignore[union-attr]


def test_destination_is_host_and_port_as_written() -> None:
    assert destination("https://User:pw@Hooks.Example.COM:8443/a/b?c#d") == "hooks.example.com:8443"
    assert destination("http://127.0.0.1:9/hook") == "127.0.0.1:9"
    assert destination("http://[::1]:80") == "[::1]:80"


async def test_webhook_claims_are_bounded_per_destination_and_skip_none(store: JobStore) -> None:
    """A destination with a backlog gives at most its bound less its tries in flight; others still get
    their turn, the longest due first."""
    slow = {"webhook": "http://slow.example:81/hook", "webhook_events": ("start",)}
    fast = {"webhook": "http://fast.example:82/hook", "webhook_events": ("start",)}
    for i in range(12):
        await store.submit(NewJob(model="kolors", params=params(i), **slow))  # type: ignore[arg-type]
    mine = await store.submit(NewJob(model="kolors", params=params(99), **fast))  # type: ignore[arg-type]
    for _ in range(13):
        assert await store.claim("w1", 30, 0.1) is not None  # each claim puts a "start" delivery in the outbox
    got = await store.claim_webhooks(30, 16, per_destination=4, busy={"slow.example:81": 1})
    by_dest = Counter(destination(d.url) for d in got)
    assert by_dest == {"slow.example:81": 3, "fast.example:82": 1}
    assert [d.job_id for d in got if "fast" in d.url] == [mine.id]
    more = await store.claim_webhooks(30, 16, per_destination=4, busy={"slow.example:81": 4})
    assert more == []  # the slow one is at its bound; nothing else is due
    rest = await store.claim_webhooks(30, 16)  # no bound: the old behaviour
    assert len(rest) == 9 and {destination(d.url) for d in rest} == {"slow.example:81"}
