"""What only the Redis store has: several instances (API replicas, workers) sharing one Redis, the
queue's plain structures (the fair queues, the leases, the wake list), TTLs, pub/sub, blob files.
The shared behaviour is in test_store.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from kolors_api.jobs import (  # noqa: E402
    AlreadyExists,
    InsufficientFunds,
    JobState,
    Lease,
    NewJob,
    TooManyRunning,
    hash_key,
    make_key_record,
    new_key,
)
from kolors_api.jobs.batching import BatchBuilder, BatchLimits  # noqa: E402
from kolors_api.jobs.redis import RedisStore  # noqa: E402
from tests.conftest import REDIS_URL  # noqa: E402
from tests.store_helpers import delete_redis_keys  # noqa: E402

MakeStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def make(raw: Any) -> AsyncIterator[MakeStore]:
    """Stores on one fresh prefix: each call is another process (API replica or worker) of one fleet."""
    prefix = f"kolors-test-{uuid.uuid4().hex[:8]}:"
    stores: list[RedisStore] = []

    async def factory(**kw: Any) -> RedisStore:
        store = RedisStore(REDIS_URL, prefix=prefix, **kw)
        await store.open()
        stores.append(store)
        return store

    yield factory
    await delete_redis_keys(stores[0])
    for store in stores:
        await store.close()
    assert [k async for k in raw.scan_iter(match=stores[0].keys.everything)] == []


def params(seed: int = 1) -> dict[str, object]:
    return {"prompt": "一只狐狸 a fox", "seed": seed, "steps": 2, "width": 512, "height": 512,
            "number_of_images": 1, "output_format": "png"}


async def test_two_replicas_see_the_same_jobs(make: MakeStore) -> None:
    api_a, api_b, worker = await make(), await make(), await make()
    first = await api_a.submit(NewJob(model="kolors", params=params(1)))
    second = await api_b.submit(NewJob(model="kolors", params=params(2)))
    got = await api_b.get(first.id)
    assert got is not None and got.params == params(1) and got.state == JobState.QUEUED
    assert [await api_a.queue_position(first.id), await api_b.queue_position(second.id)] == [0, 1]
    lease = await worker.claim("w1", 30, 1)
    assert lease is not None and lease.job.id == first.id
    seen = await api_a.get(first.id)
    assert seen is not None and seen.state == JobState.PROCESSING
    assert await api_b.queue_position(second.id) == 0
    assert await worker.complete(lease, [b"img"], "png", [1], {})
    assert await api_a.read_output(first.id, 0) == b"img"
    assert (await api_b.stats()).queued == 1


async def test_a_stale_lease_cannot_complete_after_another_instance_reclaimed_it(make: MakeStore) -> None:
    worker_a, worker_b = await make(), await make()
    key = make_key_record("erin", new_key(), credits=5.0)
    await worker_a.add_key(key)
    job = await worker_a.submit(NewJob(model="kolors", params=params(), cost=2.0, key_id=key.id))
    stale = await worker_a.claim("a", 0.2, 1)
    assert stale is not None
    await asyncio.sleep(0.3)
    fresh = await worker_b.claim("b", 30, 1)
    assert fresh is not None and fresh.job.id == job.id and fresh.delivery == 2
    assert not await worker_a.heartbeat(stale, 30)
    assert not await worker_a.progress(stale, 1, 2)
    assert not await worker_a.complete(stale, [b"stale"], "png", [1], {})
    assert not await worker_a.fail(stale, "late")
    assert await worker_b.complete(fresh, [b"fresh"], "png", [1], {})
    assert not await worker_a.complete(stale, [b"stale"], "png", [1], {})
    assert await worker_a.read_output(job.id, 0) == b"fresh"
    # captured once, the key's slot released once
    assert [e.kind for e in await worker_b.ledger(key.id)] == ["topup", "reserve", "capture"]
    assert await worker_a.running_count(key.id) == 0
    stats = await worker_a.stats()
    assert (stats.reclaims, stats.processing, stats.queued) == (1, 0, 0)


async def test_pubsub_wakes_wait_across_instances(make: MakeStore) -> None:
    api, worker = await make(), await make()
    api.recheck = 60.0  # no fallback re-check within the test: only a publication can wake the waiter
    job = await api.submit(NewJob(model="kolors", params=params()))
    waiting = asyncio.create_task(api.wait(job.id, job.version, 30))
    while job.id not in api._waiters:  # the waiter is subscribed and has read the job once
        await asyncio.sleep(0.01)
    lease = await worker.claim("w1", 30, 1)
    assert lease is not None
    woken = await asyncio.wait_for(waiting, 10)
    assert woken is not None and woken.state == JobState.PROCESSING
    waiting = asyncio.create_task(api.wait(job.id, woken.version, 30))
    while job.id not in api._waiters:
        await asyncio.sleep(0.01)
    assert await worker.progress(lease, 1, 2)
    stepped = await asyncio.wait_for(waiting, 10)
    assert stepped is not None and (stepped.step, stepped.total_steps) == (1, 2)


async def test_finished_records_and_images_are_gone_past_retention_and_swept(make: MakeStore, raw: Any) -> None:
    """A finished job (its images in its hash) is gone to every reader at its `expires_at` (the server's
    clock), and the expiry sweep deletes it; queued and running jobs never expire."""
    store = await make(retention=1.0)
    done = await store.submit(NewJob(model="kolors", params=params(1)))
    failed = await store.submit(NewJob(model="kolors", params=params(2)))
    lease = await store.claim("w1", 30, 1)
    assert lease is not None and lease.job.id == done.id
    assert await store.complete(lease, [b"a", b"b"], "png", [1, 2], {})
    # the images are fields of the job's hash (readers of the job get them only one at a time)
    assert await raw.hmget(store.keys.job(done.id), ["out:0", "out:1"]) == [b"a", b"b"]
    assert not await raw.exists(store.keys.output(done.id, 0))
    assert await store.read_output(done.id, 1) == b"b"
    got = await store.get(done.id)
    assert got is not None and got.finished_at is not None
    assert got.expires_at == pytest.approx(got.finished_at + 1.0)
    cancelled = await store.request_cancel(failed.id)
    assert cancelled is not None and cancelled.state == JobState.FAILED
    # an image the layout before stored in a key of its own is still read
    await raw.hdel(store.keys.job(done.id), "inline", "out:0", "out:1")
    await raw.set(store.keys.output(done.id, 0), b"old")
    assert await store.read_output(done.id, 0) == b"old"
    queued = await store.submit(NewJob(model="kolors", params=params(3)))
    await asyncio.sleep(1.2)
    for job_id in (done.id, failed.id):
        assert await store.get(job_id) is None and await store.read_output(job_id, 0) is None
        assert await store.request_cancel(job_id) is None
    assert await raw.exists(store.keys.job(done.id))  # until the sweep
    assert await store.expire() == 2
    assert not await raw.exists(store.keys.job(done.id), store.keys.job(failed.id), store.keys.output(done.id, 0))
    still = await store.get(queued.id)
    assert still is not None and still.state == JobState.QUEUED


async def test_credit_reservation_is_atomic_under_concurrent_submits(make: MakeStore) -> None:
    replicas = [await make() for _ in range(2)]
    key = make_key_record("frank", new_key(), credits=5.0)
    await replicas[0].add_key(key)

    async def submit(i: int) -> bool:
        try:
            await replicas[i % 2].submit(NewJob(model="kolors", params=params(i), cost=1.0, key_id=key.id))
        except InsufficientFunds:
            return False
        return True

    accepted = await asyncio.gather(*(submit(i) for i in range(50)))
    assert sum(accepted) == 5
    record = await replicas[1].get_key(key.id)
    assert record is not None and record.credits == 0
    ledger = await replicas[1].ledger(key.id)
    assert sum(e.amount for e in ledger) == pytest.approx(record.credits)
    assert [e.kind for e in ledger].count("reserve") == 5
    assert await replicas[0].running_count(key.id) == 5
    assert (await replicas[0].stats()).queued == 5


async def test_concurrent_workers_claim_each_job_exactly_once(make: MakeStore) -> None:
    api = await make()
    workers = [await make() for _ in range(3)]
    ids = {(await api.submit(NewJob(model="kolors", params=params(i)))).id for i in range(20)}
    claimed: list[str] = []

    async def work(store: RedisStore, name: str) -> None:
        while (lease := await store.claim(name, 30, 0.2)) is not None:
            claimed.append(lease.job.id)
            assert await store.complete(lease, [b"x"], "png", [1], {})

    await asyncio.gather(*(work(w, f"w{i}{j}") for i, w in enumerate(workers) for j in range(2)))
    assert sorted(claimed) == sorted(ids)
    stats = await api.stats()
    assert (stats.queued, stats.processing, stats.reclaims) == (0, 0, 0)


async def test_a_cancelled_queued_job_leaves_the_queue_and_is_never_claimed(
        make: MakeStore, raw: Any) -> None:
    store = await make()
    key = make_key_record("gina", new_key(), credits=3.0)
    await store.add_key(key)
    cancelled = await store.submit(NewJob(model="kolors", params=params(1), cost=1.0, key_id=key.id))
    kept = await store.submit(NewJob(model="kolors", params=params(2), cost=1.0, key_id=key.id))
    got = await store.request_cancel(cancelled.id)
    assert got is not None and got.state == JobState.FAILED and got.error == "cancelled"
    assert await raw.zrange(store.keys.fair_queue(key.id), 0, -1) == [kept.id.encode()]
    assert (await store.stats()).queued == 1
    assert await store.queue_position(kept.id) == 0
    lease = await store.claim("w1", 30, 0.2)
    assert lease is not None and lease.job.id == kept.id
    assert await store.claim("w1", 30, 0.1) is None
    record = await store.get_key(key.id)
    assert record is not None and record.credits == pytest.approx(2.0)
    assert [e.kind for e in await store.ledger(key.id)] == ["topup", "reserve", "reserve", "refund"]


async def test_a_lease_entry_whose_job_ended_is_dropped_by_the_next_claim(make: MakeStore, raw: Any) -> None:
    """`leases` may hold a job that ended another way (written by hand, or by a crash between two
    versions): a claim past its deadline drops it, delivers nothing and counts no reclaim."""
    store = await make()
    job = await store.submit(NewJob(model="kolors", params=params()))
    await store.request_cancel(job.id)
    await raw.zadd(store.keys.leases, {job.id: 1.0})  # a deadline long past
    assert await store.claim("w1", 30, 0.1) is None
    assert await raw.zcard(store.keys.leases) == 0
    after = await store.get(job.id)
    assert after is not None and after.state == JobState.FAILED and after.deliveries == 0
    assert (await store.stats()).reclaims == 0


async def test_the_stats_count_the_queued_and_the_running_jobs(make: MakeStore, raw: Any) -> None:
    """What KEDA scales on (`kolors_queue_depth`, `kolors_jobs_processing`, from `stats`) follows the
    jobs, whatever the fair order takes first: the queued ones, and one lease per running one."""
    store = await make()
    first, second = (make_key_record(n, new_key()) for n in ("a", "b"))
    for key in (first, second):
        await store.add_key(key)
    ids = [(await store.submit(NewJob(model="kolors", params=params(i), key_id=(first, second)[i // 3].id))).id
           for i in range(6)]
    await store.request_cancel(ids[1])
    stats = await store.stats()
    assert (stats.queued, stats.processing) == (5, 0)
    leases = [await store.claim("w1", 30, 0.1) for _ in range(3)]
    taken = [lease.job.id for lease in leases if lease]
    # one of each key first (both start at the same virtual time), then a tie again: ties go to the
    # smaller key id (the ids are random: either key may be that one)
    by_key = {first.id: [ids[0], ids[2]], second.id: [ids[3], ids[4]]}
    small, large = sorted(by_key)
    assert taken == [by_key[small][0], by_key[large][0], by_key[small][1]]
    stats = await store.stats()
    assert (stats.queued, stats.processing) == (2, 3)
    assert sorted(m.decode() for m in await raw.zrange(store.keys.leases, 0, -1)) == sorted(taken)
    for lease in leases:
        assert lease is not None and await store.complete(lease, [b"x"], "png", [1], {})
    stats = await store.stats()
    assert (stats.queued, stats.processing) == (2, 0)
    assert await raw.zcard(store.keys.leases) == 0


async def test_an_idle_worker_blocks_until_a_submit_wakes_it(make: MakeStore, raw: Any) -> None:
    """No polling: a claim with nothing queued blocks on the wake list, and another process's submit
    ends the wait at once (long before the claim's timeout). A submit pushes a wake-up only for a worker
    asleep that none was pushed for yet (``fair`` ``idle``): busy workers find the job themselves. The
    claim that takes the last queued job counts its worker asleep then (its next claim sleeps at once)."""
    worker, api = await make(), await make()
    await api.submit(NewJob(model="kolors", params=params(1)))
    await api.submit(NewJob(model="kolors", params=params(2)))
    assert await raw.llen(worker.keys.wake) == 0  # nobody asleep
    for n in range(2):
        assert await worker.claim("w1", 30, 0.1) is not None
        assert await raw.hget(worker.keys.fair, "idle") in ((None, b"0"), (b"1",))[n]
    claiming = asyncio.create_task(worker.claim("w1", 30, 20))
    await asyncio.sleep(0.3)
    assert not claiming.done()
    assert await raw.hget(worker.keys.fair, "idle") == b"1"
    job = await api.submit(NewJob(model="kolors", params=params(3)))
    started = asyncio.get_running_loop().time()
    lease = await asyncio.wait_for(claiming, 5)
    assert lease is not None and lease.job.id == job.id
    assert asyncio.get_running_loop().time() - started < 1.0  # woken, not timed out (20 s)
    # job 3 was the last queued: its worker is counted asleep again, and the next submits push one
    # wake-up for it, not one each
    assert await raw.llen(worker.keys.wake) == 0 and await raw.hget(worker.keys.fair, "idle") == b"1"
    four = await api.submit(NewJob(model="kolors", params=params(4)))
    await api.submit(NewJob(model="kolors", params=params(5)))
    assert await raw.llen(worker.keys.wake) == 1
    lease = await worker.claim("w1", 30, 0.1)
    assert lease is not None and lease.job.id == four.id
    assert await raw.llen(worker.keys.wake) == 0 and await raw.hget(worker.keys.fair, "idle") == b"0"
    assert await worker.claim("w1", 30, 0.1) is not None  # (the fifth, found without a wake-up)


async def test_a_renewed_lease_is_kept_until_it_runs_out(make: MakeStore) -> None:
    store = await make()
    job = await store.submit(NewJob(model="kolors", params=params()))
    holder = await store.claim("w1", 0.8, 1)
    assert holder is not None
    await asyncio.sleep(0.3)
    assert await store.claim("w2", 30, 0.05) is None
    assert await store.heartbeat(holder, 0.8)
    await asyncio.sleep(0.6)  # past the first deadline, not past the renewed one
    assert await store.claim("w2", 30, 0.05) is None
    await asyncio.sleep(0.4)  # now the renewed lease has run out
    taker = await store.claim("w2", 30, 1)
    assert taker is not None and taker.job.id == job.id and taker.delivery == 2
    assert not await store.progress(holder, 1, 2)


async def test_a_dead_letter_is_refunded_and_recorded(make: MakeStore, raw: Any) -> None:
    store = await make(max_deliveries=1)
    key = make_key_record("hank", new_key(), credits=2.0)
    await store.add_key(key)
    job = await store.submit(NewJob(model="kolors", params=params(), cost=1.0, key_id=key.id))
    assert await store.claim("w1", 0.1, 1) is not None
    await asyncio.sleep(0.2)
    assert await store.claim("w2", 0.1, 0.1) is None
    got = await store.get(job.id)
    assert got is not None and got.state == JobState.FAILED and got.error == "worker lost 1 times"
    record = await store.get_key(key.id)
    assert record is not None and record.credits == pytest.approx(2.0)
    assert [e.kind for e in await store.ledger(key.id)] == ["topup", "reserve", "refund"]
    assert await store.running_count(key.id) == 0
    letters = await raw.xrange(store.keys.dead_letters)
    assert [(f[b"job"], f[b"reason"]) for _, f in letters] == [(job.id.encode(), b"worker lost 1 times")]
    assert await raw.zcard(store.keys.leases) == 0
    stats = await store.stats()
    assert (stats.dead_letters, stats.reclaims, stats.processing) == (1, 1, 0)


async def test_blob_dir_holds_only_the_lease_holders_files(make: MakeStore, raw: Any, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    worker_a, worker_b = await make(blob_dir=blobs, retention=0.5), await make(blob_dir=blobs, retention=0.5)
    job = await worker_a.submit(NewJob(model="kolors", params=params()))
    stale = await worker_a.claim("a", 0.2, 1)
    assert stale is not None
    await asyncio.sleep(0.3)
    fresh = await worker_b.claim("b", 30, 1)
    assert fresh is not None
    assert await worker_b.complete(fresh, [b"one", b"two"], "png", [1, 2], {})
    assert not await worker_a.complete(stale, [b"stale"], "png", [1], {})
    assert sorted(p.relative_to(blobs).as_posix() for p in blobs.rglob("*")) == [
        job.id, f"{job.id}/0.png", f"{job.id}/1.png"]
    assert await worker_a.read_output(job.id, 1) == b"two"
    assert await raw.exists(worker_a.keys.output(job.id, 0)) == 0  # not in Redis
    await asyncio.sleep(0.6)
    assert await worker_a.expire() == 1
    assert not (blobs / job.id).exists()
    assert await worker_b.read_output(job.id, 0) is None


async def test_images_of_a_worker_that_died_before_moving_them_stay_readable_until_expiry(
        make: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = tmp_path / "blobs"
    worker, api = await make(blob_dir=blobs, retention=0.5), await make(blob_dir=blobs)
    job = await api.submit(NewJob(model="kolors", params=params()))
    lease = await worker.claim("w1", 30, 1)
    assert lease is not None and worker.blobs is not None
    monkeypatch.setattr(worker.blobs, "commit", lambda job_id, token: None)  # dies right after its commit
    assert await worker.complete(lease, [b"one", b"two"], "png", [1, 2], {})
    assert [await api.read_output(job.id, i) for i in range(2)] == [b"one", b"two"]
    await asyncio.sleep(0.6)
    assert await api.expire() == 1
    assert not (blobs / job.id).exists()


async def test_expire_sweeps_history_and_the_expiry_index(make: MakeStore, raw: Any) -> None:
    store = await make(retention=0.3)
    key = make_key_record("iris", new_key())
    await store.add_key(key)
    old = await store.submit(NewJob(model="kolors", params=params(1), key_id=key.id))
    lease = await store.claim("w1", 30, 1)
    assert lease is not None and await store.complete(lease, [b"x"], "png", [1], {})
    await asyncio.sleep(0.4)
    live = await store.submit(NewJob(model="kolors", params=params(2), key_id=key.id))
    page, cursor = await store.history(key.id, 10, None)
    assert [j.id for j in page] == [live.id] and cursor is None  # the expired one is skipped already
    assert await store.expire() == 1
    assert await raw.zrange(store.keys.history(key.id), 0, -1) == [live.id.encode()]
    assert await raw.zcard(store.keys.expiring) == 0
    assert await store.get(old.id) is None


async def test_keys_list_in_creation_order_and_credit_changes_are_ledgered(make: MakeStore) -> None:
    store = await make()
    first = make_key_record("a", new_key(), credits=1.5)
    second = make_key_record("b", new_key(), max_concurrency=2)
    second.created_at = first.created_at + 1
    await store.add_key(second)
    await store.add_key(first)
    assert [k.id for k in await store.list_keys()] == [first.id, second.id]
    updated = await store.update_key(first.id, credits=4.0, max_concurrency=None, rate_limit="5/min")
    assert updated is not None and updated.credits == 4.0 and updated.rate_limit == "5/min"
    updated = await store.update_key(second.id, add_credits=2.5, max_concurrency=None)
    assert updated is not None and updated.credits == 2.5 and updated.max_concurrency is None
    assert [e.amount for e in await store.ledger(first.id)] == [1.5, 2.5]
    assert [e.amount for e in await store.ledger(second.id)] == [2.5]
    unlimited = await store.update_key(first.id, credits=None)
    assert unlimited is not None and unlimited.credits is None
    assert await store.update_key("missing", name="x") is None
    with pytest.raises(AlreadyExists, match="exists"):
        await store.add_key(first)


async def test_jobs_of_the_stream_layout_are_moved_over_on_the_first_start(raw: Any) -> None:
    """A fleet upgraded in place loses nothing: the keys the layout before the plain queue wrote (a
    stream of tickets with its group, `tickets`, `queued`, `processing`, the job fields `entry` and
    `lease_ms`, an older version's `hooks-due`), written here by hand with that version's names, are
    moved over when the first store of this version opens: the queued jobs are claimed in their fair
    order, a running job whose worker died meanwhile is reclaimed at once, one whose lease still
    runs is kept (its holder completes it), and all of them finish."""
    prefix = f"kolors-test-{uuid.uuid4().hex[:8]}:"
    key = make_key_record("old", new_key())
    first = RedisStore(REDIS_URL, prefix=prefix)  # only to add the key (the key records did not change)
    await first.add_key(key)
    await first.close()
    await raw.delete(prefix + "wake", prefix + "fair")
    t = float((await raw.time())[0])
    kid = key.id
    stream, group = prefix + "queue", "workers"
    await raw.xgroup_create(stream, group, id="0", mkstream=True)

    async def old_job(n: int, state: str, **extra: Any) -> str:
        job_id = f"old{n}-{uuid.uuid4().hex[:6]}"
        fields = {"id": job_id, "model": "kolors", "params": json.dumps(params(n)), "state": state, "cost": "0",
                  "created_at": repr(t - 10 + n), "step": "0", "total_steps": "0", "outputs": "0", "ext": "",
                  "seeds": "[]", "metrics": "{}", "deliveries": "0", "cancel_requested": "0", "version": "1",
                  "seq": str(n), "reserved": "1", "key_id": kid, "work": "1", "odo": str(n - 1), **extra}
        await raw.hset(prefix + "job:" + job_id, mapping=fields)
        await raw.zadd(prefix + "history:" + kid, {job_id: n})
        await raw.incr(prefix + "running:" + kid)
        await raw.xadd(stream, {"job": job_id})  # its ticket
        return job_id

    # two running jobs (tickets read by their workers, bound in `tickets`), the first one's worker dead
    dead = await old_job(1, "PROCESSING", deliveries="1", version="2", lease_token="t-dead", lease_worker="w-old",
                         lease_until=repr(t - 5), lease_ms="30000", started_at=repr(t - 8))
    alive = await old_job(2, "PROCESSING", deliveries="1", version="2", lease_token="t-alive",
                          lease_worker="w-old", lease_until=repr(t + 60), lease_ms="30000", started_at=repr(t - 1))
    read = await raw.xreadgroup(group, "w-old", {stream: ">"}, count=2)
    for entry_id, entry in read[0][1]:
        await raw.hset(prefix + "tickets", entry_id, entry[b"job"])
        await raw.hset(prefix + "job:" + entry[b"job"].decode(), "entry", entry_id)
    await raw.sadd(prefix + "processing", dead, alive)
    # two queued jobs: `queued` by seq, and their key's fair queue by odometer
    queued = [await old_job(n, "QUEUED") for n in (3, 4)]
    await raw.zadd(prefix + "queued", {job_id: n for n, job_id in zip((3, 4), queued, strict=True)})
    await raw.zadd(prefix + "fair-queue:" + kid, {job_id: n - 1 for n, job_id in zip((3, 4), queued, strict=True)})
    await raw.zadd(prefix + "fair-active", {kid: 2.0})
    await raw.hset(prefix + "fair", mapping={"vtime": "2", "odo:" + kid: "4", "finish:" + kid: "2"})
    # an older version's webhook delivery, due now
    await raw.hset(prefix + "hook:d1", mapping={"id": "d1", "job": queued[0], "event": "start", "key_id": kid,
                                                "url": "http://hooks.example:9/x", "state": "pending", "attempts": "0"})
    await raw.zadd(prefix + "hooks-due", {"d1": t - 1})

    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        await store.open()
        for old in ("queue", "tickets", "queued", "processing", "hooks-due"):
            assert await raw.exists(prefix + old) == 0, old
        assert (await store.get(dead)).state == JobState.QUEUED  # type: ignore[union-attr]  # lapsed: as_seen
        stats = await store.stats()
        assert (stats.queued, stats.processing) == (2, 2)
        assert [d.id for d in await store.claim_webhooks(30, 10)] == ["d1"]
        reclaimed = await store.claim("w-new", 30, 1)
        assert reclaimed is not None and reclaimed.job.id == dead and reclaimed.delivery == 2
        fresh = [await store.claim("w-new", 30, 1) for _ in queued]
        assert [lease.job.id for lease in fresh if lease] == queued
        assert await store.claim("w-new", 30, 0.05) is None  # the live lease is not handed out
        holder = Lease(job=(await store.get(alive)), token="t-alive", worker_id="w-old", delivery=1)  # type: ignore[arg-type]
        assert await store.heartbeat(holder, 30)
        for lease in [reclaimed, *fresh, holder]:
            assert lease is not None and await store.complete(lease, [b"x"], "png", [1], {})
        for job_id in [dead, alive, *queued]:
            done = await store.get(job_id)
            assert done is not None and done.state == JobState.COMPLETED, job_id
        assert await store.running_count(kid) == 0
        stats = await store.stats()
        assert (stats.queued, stats.processing) == (0, 0)
    finally:
        await delete_redis_keys(store)
        await store.close()


async def test_a_worker_waiting_for_company_hears_a_submit_and_leaves_the_idle_workers_wake_up(
        make: MakeStore, raw: Any) -> None:
    """`wait_for_work` on Redis: a submit in another process ends the wait at once (no polling: long
    before its timeout), and the wake-up an idle worker blocks on is still there for it."""
    worker, idle, api = await make(), await make(), await make()
    await api.submit(NewJob(model="kolors", params=params(1)))
    head = await worker.claim("w1", 30, 0.1)
    assert head is not None
    batch = BatchBuilder(BatchLimits(max_images=4), head.job.params)
    assert await worker.claim_batch("w1", 30, batch) == []
    assert await idle.claim("w2", 30, 0.05) is None  # nothing queued: the wake list is emptied
    await worker.wait_for_work(0.01)  # subscribed (and any earlier submit heard)
    waiting = asyncio.create_task(worker.wait_for_work(20))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    loop = asyncio.get_running_loop()
    other = await api.submit(NewJob(model="kolors", params={**params(2), "width": 1024}))  # another shape
    started = loop.time()
    await asyncio.wait_for(waiting, 5)
    assert loop.time() - started < 1.0  # woken, not timed out (20 s)
    assert await worker.claim_batch("w1", 30, batch) == []  # it does not fit
    assert await raw.llen(worker.keys.wake) == 1
    taken = await idle.claim("w2", 30, 0.5)
    assert taken is not None and taken.job.id == other.id
    alike = await api.submit(NewJob(model="kolors", params=params(3)))
    await asyncio.wait_for(worker.wait_for_work(20), 5)
    assert [lease.job.id for lease in await worker.claim_batch("w1", 30, batch)] == [alike.id]


async def test_max_concurrency_set_later_counts_the_jobs_already_there(make: MakeStore) -> None:
    """A key without max_concurrency keeps no count of its unfinished jobs (they are ``uncounted``: no
    write when they end); setting one counts those there, so the bound holds at once, and each of them
    leaves the count when it ends."""
    store = await make()
    key = make_key_record("later", new_key())
    await store.add_key(key)
    for n in (1, 2):
        await store.submit(NewJob(model="kolors", params=params(n), key_id=key.id))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and await store.running_count(key.id) == 2
    await store.update_key(key.id, max_concurrency=2)
    with pytest.raises(TooManyRunning):
        await store.submit(NewJob(model="kolors", params=params(3), key_id=key.id))
    assert await store.complete(lease, [b"x"], "png", [1], {})
    assert await store.running_count(key.id) == 1
    await store.submit(NewJob(model="kolors", params=params(4), key_id=key.id))
    assert await store.running_count(key.id) == 2


async def test_a_key_record_is_kept_only_until_a_change_is_heard(make: MakeStore, raw: Any) -> None:
    """An API replica keeps key records by hash (a request's authentication costs no round trip) while its
    ``keys-changed`` subscription holds; a change made through another replica is heard at once."""
    api, admin = await make(), await make()
    plain = new_key()
    key = make_key_record("kept", plain)
    await admin.add_key(key)

    async def reads() -> int:
        stats = await raw.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("hget", "hgetall"))

    first = await api.key_by_hash(hash_key(plain))
    assert first is not None and first.enabled
    before = await reads()
    again = await asyncio.gather(*(api.key_by_hash(hash_key(plain)) for _ in range(5)))
    assert all(k is not None and k.id == key.id for k in again) and await reads() == before
    await admin.update_key(key.id, enabled=False)
    for _ in range(100):  # heard within the publication's latency
        record = await api.key_by_hash(hash_key(plain))
        if record is not None and not record.enabled:
            break
        await asyncio.sleep(0.01)
    assert record is not None and not record.enabled
    assert await admin.delete_key(key.id)
    for _ in range(100):
        if await api.key_by_hash(hash_key(plain)) is None:
            break
        await asyncio.sleep(0.01)
    assert await api.key_by_hash(hash_key(plain)) is None


async def test_a_lease_renewed_shorter_is_reclaimed_when_the_renewal_runs_out(make: MakeStore) -> None:
    """A claim looks at the leases only once ``lease_min`` (a lower bound of their deadlines) is past: a
    renewal shorter than the lease it renews moves the bound down with it."""
    store = await make()
    await store.submit(NewJob(model="kolors", params=params()))
    holder = await store.claim("w1", 30, 1)
    assert holder is not None
    assert await store.claim("w2", 30, 0.05) is None  # (the bound: 30 s ahead)
    assert await store.heartbeat(holder, 0.2)
    await asyncio.sleep(0.4)
    # (a worker that looked before the renewal waits on wake-ups until then, QUIET_SECONDS at most)
    again = await store.claim("w3", 30, 0.5)
    assert again is not None and again.job.id == holder.job.id and again.delivery == 2


async def test_an_idle_webhook_runner_sleeps_until_a_delivery_is_made_or_due(make: MakeStore) -> None:
    """`wait_for_webhooks` on Redis: no polling; a delivery made in another process wakes the runner at
    once, and one a claim left (its lease runs out) wakes it when due, not HOOKS_IDLE later."""
    runner, worker = await make(), await make()
    loop = asyncio.get_running_loop()
    assert await runner.claim_webhooks(0.5, 10) == []
    await runner.wait_for_webhooks(0.01)  # subscribed: the first returns at once
    waiting = asyncio.create_task(runner.wait_for_webhooks(0.01))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # nothing is due: no look
    await worker.submit(NewJob(model="kolors", params=params(), webhook="http://h.x/y", webhook_events=("start",)))
    assert await worker.claim("w1", 30, 0.1) is not None  # the "start" delivery is made
    started = loop.time()
    await asyncio.wait_for(waiting, 3)
    # Due at the worker's clock; the runner's may be behind it by up to half a round trip of its last
    # TIME (milliseconds on a loaded machine): its claim then names the wait, and one wait takes it.
    claimed = await runner.claim_webhooks(0.5, 10)
    if not claimed:
        await runner.wait_for_webhooks(0.01)
        claimed = await runner.claim_webhooks(0.5, 10)
    assert loop.time() - started < 1.0
    assert len(claimed) == 1  # taken, not recorded: due again in 0.5 s
    started = loop.time()
    await runner.wait_for_webhooks(0.01)
    assert 0.3 < loop.time() - started < 2.0
    assert len(await runner.claim_webhooks(0.5, 10)) == 1


async def test_a_claim_takes_the_head_key_out_of_fair_active_and_puts_it_back_while_it_has_more(
        make: MakeStore, raw: Any) -> None:
    """A claim takes the key with the smallest tag out of ``fair-active`` (ZPOPMIN) and puts it back, with
    its new tag, only while more of its jobs are queued: the claim of a key's last queued job writes nothing
    there (no ZREM), so a key drained and refilled costs one ZADD, the refilling submit's."""
    from kolors_api.jobs import fair

    store = await make()
    key = make_key_record("a", new_key())
    await store.add_key(key)
    for i in range(2):
        await store.submit(NewJob(model="kolors", params=params(i), key_id=key.id))
    await raw.config_resetstat()
    assert await store.claim("w1", 30, 0.1) is not None
    assert await raw.zscore(store.keys.fair_active, key.id) == pytest.approx(fair.work(params()))  # its new tag
    assert await store.claim("w1", 30, 0.1) is not None
    assert await raw.zcard(store.keys.fair_active) == 0
    assert await store.claim("w1", 30, 0.1) is None  # (nothing queued: nothing to take out)
    stats = await raw.info("commandstats")
    assert "cmdstat_zrem" not in stats, sorted(stats)
    assert int(stats["cmdstat_zadd"]["calls"]) == 3  # the first claim's tag, and each lease
    await store.submit(NewJob(model="kolors", params=params(3), key_id=key.id))
    assert await raw.zcard(store.keys.fair_active) == 1
