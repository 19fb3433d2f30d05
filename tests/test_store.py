"""The shared store suite: every backend of `JobStore` runs through these same tests."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from kolors_api.jobs import (
    AlreadyExists,
    BalanceOutOfRange,
    IdempotencyMismatch,
    InsufficientFunds,
    Job,
    JobState,
    JobStore,
    Lease,
    NewJob,
    QueueFull,
    StoreError,
    TooManyRunning,
    WebhookAttempt,
    hash_key,
    make_blobs,
    make_key_record,
    new_key,
)
from kolors_api.jobs.base import MAX_CREDITS, micro
from kolors_api.jobs.blobs import Blobs
from tests.conftest import REDIS_URL
from tests.store_helpers import StateWatch, delete_redis_keys

#: SQLite (images as files); Redis with images in Redis; Redis with images in a blob dir; SQLite and
#: Redis with images on S3 (moto's server on loopback, through boto3 as in production).
BACKENDS = ["sqlite", "redis", "redis-blobs", "sqlite-s3", "redis-s3"]
#: The two stores: the queue, lease, credit, key and webhook cases run on these; the cases that store
#: or remove images (marked `on_every_blob_store`) run on every backend of BACKENDS.
STORES = ["sqlite", "redis"]
on_every_blob_store = pytest.mark.parametrize("store", BACKENDS, indirect=True)


def s3_blobs() -> Blobs:
    """The production S3 blob store on a new bucket of the moto server `moto_s3` started."""
    bucket = f"kolors-test-{uuid.uuid4().hex[:12]}"
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return make_blobs(f"s3://{bucket}/outputs")


async def make(backend: str, tmp_path: Path, **kw: float) -> JobStore:
    """A store of `backend`, watched: every job state it shows must follow TRANSITIONS."""
    retention = float(kw.get("retention", 3600.0))
    max_deliveries = int(kw.get("max_deliveries", 3))
    blobs = s3_blobs() if backend.endswith("-s3") else None
    if backend.startswith("sqlite"):
        from kolors_api.jobs.sqlite import SQLiteStore

        store: JobStore = SQLiteStore(tmp_path / "db.sqlite3", retention=retention, max_deliveries=max_deliveries,
                                      blobs=blobs)
    else:
        redis_mod = pytest.importorskip("kolors_api.jobs.redis")
        store = redis_mod.RedisStore(REDIS_URL, retention=retention, max_deliveries=max_deliveries,
                                     prefix=f"kolors-test-{uuid.uuid4().hex[:8]}:", blobs=blobs,
                                     blob_dir=tmp_path / "blobs" if backend == "redis-blobs" else None)
    StateWatch(store)
    await store.open()
    return store


async def drop(store: JobStore) -> None:
    if hasattr(store, "keys"):  # Redis: remove this test's prefix
        await delete_redis_keys(store)
    await store.close()


async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    """`make` for a parametrised store fixture (`request.param` of BACKENDS), moto's server started
    first for the S3 backends."""
    if request.param.endswith("-s3"):
        request.getfixturevalue("moto_s3")
    return await make(request.param, tmp_path)


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await open_store(request, tmp_path)
    yield s
    await drop(s)


def params(seed: int = 1) -> dict[str, object]:
    return {"prompt": "a fox", "seed": seed, "steps": 2, "width": 512, "height": 512,
            "number_of_images": 1, "output_format": "png"}


async def test_submit_then_get_returns_the_queued_job(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    got = await store.get(job.id)
    assert got is not None and got.state == JobState.QUEUED and got.params == params()
    assert await store.get("nope") is None
    assert await store.queue_position(job.id) == 0


async def test_claims_are_in_submission_order_with_positions(store: JobStore) -> None:
    jobs = [await store.submit(NewJob(model="kolors", params=params(i))) for i in range(3)]
    assert [await store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    first = await store.claim("w1", 30, 0.1)
    second = await store.claim("w1", 30, 0.1)
    assert first is not None and second is not None
    assert [first.job.id, second.job.id] == [jobs[0].id, jobs[1].id]
    assert first.job.state == JobState.PROCESSING and first.delivery == 1
    assert await store.queue_position(jobs[2].id) == 0
    assert await store.queue_position(jobs[0].id) is None


async def test_claim_on_an_empty_queue_waits_then_returns_none(store: JobStore) -> None:
    t0 = time.monotonic()
    assert await store.claim("w1", 30, 0.3) is None
    assert time.monotonic() - t0 >= 0.25


async def test_claim_wakes_when_a_job_arrives(store: JobStore) -> None:
    async def later() -> None:
        await asyncio.sleep(0.2)
        await store.submit(NewJob(model="kolors", params=params()))

    task = asyncio.create_task(later())
    lease = await store.claim("w1", 30, 5)
    await task
    assert lease is not None


@on_every_blob_store
async def test_complete_stores_outputs_and_is_fenced(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    assert await store.progress(lease, 1, 2)
    mid = await store.get(job.id)
    assert mid is not None and (mid.step, mid.total_steps) == (1, 2)
    assert await store.complete(lease, [b"img0", b"img1"], "png", [1, 2], {"inference_time": 0.5})
    done = await store.get(job.id)
    assert done is not None and done.state == JobState.COMPLETED
    assert done.outputs == 2 and done.ext == "png" and done.seeds == [1, 2]
    assert done.metrics == {"inference_time": 0.5}
    assert await store.read_output(job.id, 0) == b"img0"
    assert await store.read_output(job.id, 1) == b"img1"
    assert await store.read_output(job.id, 2) is None
    # a second completion with the same lease, or a failure after it, changes nothing
    assert not await store.complete(lease, [b"other"], "png", [1], {})
    assert not await store.fail(lease, "late")
    again = await store.get(job.id)
    assert again is not None and again.state == JobState.COMPLETED and again.outputs == 2


@on_every_blob_store
async def test_progress_keeps_the_latest_preview_fenced_by_the_lease(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    assert await store.read_preview(job.id) is None
    assert await store.progress(lease, 1, 4)
    assert await store.read_preview(job.id) is None
    assert await store.progress(lease, 2, 4, b"first")
    assert await store.progress(lease, 3, 4)  # no preview at this step: the last one stays
    assert await store.read_preview(job.id) == (2, b"first")
    assert await store.progress(lease, 4, 4, b"second")
    assert await store.read_preview(job.id) == (4, b"second")
    stale = Lease(job=lease.job, token="not-the-lease", worker_id="w2", delivery=1)
    assert not await store.progress(stale, 4, 4, b"stale")
    assert await store.read_preview(job.id) == (4, b"second")
    assert await store.read_preview("no-such-job") is None


async def test_fail_records_the_error(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and await store.fail(lease, "engine error: boom")
    got = await store.get(job.id)
    assert got is not None and got.state == JobState.FAILED and got.error == "engine error: boom"
    assert await store.read_output(job.id, 0) is None


@on_every_blob_store
async def test_expired_lease_is_reclaimed_and_the_stale_worker_is_fenced(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    stale = await store.claim("w1", 1.0, 0.1)  # 1 s: still fresh at the next line on a loaded machine
    assert stale is not None
    assert await store.claim("w2", 30, 0.05) is None  # lease still fresh
    await asyncio.sleep(1.1)
    fresh = await store.claim("w2", 30, 1)
    assert fresh is not None and fresh.job.id == job.id and fresh.delivery == 2
    assert not await store.heartbeat(stale, 30)
    assert not await store.progress(stale, 1, 2)
    assert not await store.complete(stale, [b"stale"], "png", [1], {})
    assert await store.complete(fresh, [b"fresh"], "png", [1], {})
    assert await store.read_output(job.id, 0) == b"fresh"
    assert (await store.stats()).reclaims >= 1


async def test_heartbeat_keeps_the_lease(store: JobStore) -> None:
    await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 0.4, 0.1)
    assert lease is not None
    for _ in range(4):
        await asyncio.sleep(0.2)
        assert await store.heartbeat(lease, 0.4)
    assert await store.claim("w2", 30, 0.05) is None


async def test_a_job_lost_too_often_ends_failed_as_a_dead_letter(tmp_path: Path, request: pytest.FixtureRequest,
                                                                 backend: str) -> None:
    store = await make(backend, tmp_path, max_deliveries=2)
    try:
        job = await store.submit(NewJob(model="kolors", params=params()))
        for _ in range(2):
            assert await store.claim("w", 0.1, 1) is not None
            await asyncio.sleep(0.15)
        assert await store.claim("w", 0.1, 0.2) is None
        got = await store.get(job.id)
        assert got is not None and got.state == JobState.FAILED and got.error == "worker lost 2 times"
        assert (await store.stats()).dead_letters == 1
    finally:
        await drop(store)


async def test_wait_returns_on_change_or_timeout(store: JobStore) -> None:
    job = await store.submit(NewJob(model="kolors", params=params()))
    t0 = time.monotonic()
    same = await store.wait(job.id, job.version, 0.3)
    assert same is not None and same.version == job.version and time.monotonic() - t0 >= 0.25

    async def work() -> None:
        await asyncio.sleep(0.2)
        lease = await store.claim("w1", 30, 1)
        assert lease is not None

    task = asyncio.create_task(work())
    changed = await store.wait(job.id, job.version, 5)
    await task
    assert changed is not None and changed.state == JobState.PROCESSING


async def test_a_wait_for_the_end_sleeps_through_the_steps_and_wakes_at_the_end(store: JobStore) -> None:
    """What a sync request does: it reads the job when it starts waiting and once more when the job ends,
    not at each of its steps (on Redis the steps' publications say "progress"; on SQLite the
    notification does)."""
    job = await store.submit(NewJob(model="kolors", params=params()))
    lease = await store.claim("w1", 30, 1)
    assert lease is not None
    reads: list[str] = []
    get = store.get

    async def counted(job_id: str) -> object:
        reads.append(job_id)
        return await get(job_id)

    store.get = counted  # type: ignore[method-assign]  # the same store, its reads counted
    waiting = asyncio.create_task(store.wait(job.id, lease.job.version, 30, done=True))
    await asyncio.sleep(0.1)
    started = len(reads)  # SQLite reads the job as the wait starts; Redis reads it in the script that marks it
    for step in range(1, 5):
        assert await store.progress(lease, step, 4)
    await asyncio.sleep(0.2)
    assert not waiting.done() and len(reads) == started
    assert await store.complete(lease, [b"x"], "png", [1], {})
    ended = await asyncio.wait_for(waiting, 0.6)  # woken, not the second's re-check
    assert ended is not None and ended.state == JobState.COMPLETED and reads == [job.id] * (started + 1)


async def test_results_and_their_files_expire_after_retention(tmp_path: Path, backend: str) -> None:
    store = await make(backend, tmp_path, retention=0.5)
    try:
        job = await store.submit(NewJob(model="kolors", params=params()))
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and await store.progress(lease, 1, 2, b"preview")
        assert await store.complete(lease, [b"x", b"y"], "png", [1, 2], {})
        waiting = await store.submit(NewJob(model="kolors", params=params(2)))
        blobs = getattr(store, "blobs", None)  # SQLite's outputs folder, Redis's blob dir, S3, or None
        if blobs is not None:
            # files move into place; S3 objects stay under the lease token the job records
            assert [name.removeprefix(f"{lease.token}/") for name in blobs.names(job.id)] == ["0.png", "1.png"]
        assert await store.get(job.id) is not None
        await asyncio.sleep(0.7)
        assert await store.expire() == 1  # the queued job never expires
        assert await store.get(job.id) is None
        assert await store.read_output(job.id, 0) is None
        assert await store.read_preview(job.id) is None
        assert await store.get(waiting.id) is not None
        if blobs is not None:
            assert blobs.names(job.id) == []
        assert await store.expire() == 0
    finally:
        await drop(store)


async def test_cancel_fails_a_queued_job_and_flags_a_running_one(store: JobStore) -> None:
    running = await store.submit(NewJob(model="kolors", params=params()))
    queued = await store.submit(NewJob(model="kolors", params=params(2)))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and lease.job.id == running.id
    got = await store.request_cancel(queued.id)
    assert got is not None and got.state == JobState.FAILED and got.error == "cancelled"
    flagged = await store.request_cancel(running.id)
    assert flagged is not None and flagged.state == JobState.PROCESSING and flagged.cancel_requested


@on_every_blob_store
async def test_a_cancel_that_came_before_the_completion_wins_and_is_refunded(store: JobStore) -> None:
    key = make_key_record("frank", new_key(), credits=1.0)
    await store.add_key(key)
    job = await store.submit(NewJob(model="kolors", params=params(), cost=0.4, key_id=key.id))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and await store.progress(lease, 2, 2)  # the last step
    flagged = await store.request_cancel(job.id)
    assert flagged is not None and flagged.cancel_requested and flagged.state == JobState.PROCESSING
    # the worker had already finished the images: its completion stores the cancel instead
    assert await store.complete(lease, [b"img"], "png", [1], {"inference_time": 1.0})
    got = await store.get(job.id)
    assert got is not None and (got.state, got.error, got.outputs) == (JobState.FAILED, "cancelled", 0)
    assert await store.read_output(job.id, 0) is None
    assert (await store.get_key(key.id)).credits == 1.0  # type: ignore[union-attr]
    assert [e.kind for e in await store.ledger(key.id)] == ["topup", "reserve", "refund"]
    assert not await store.complete(lease, [b"img"], "png", [1], {}), "the lease ended with the job"

    # a cancel after the completion finds a finished job and flags nothing
    done = await store.submit(NewJob(model="kolors", params=params(), cost=0.4, key_id=key.id))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and await store.complete(lease, [b"img"], "png", [1], {})
    late = await store.request_cancel(done.id)
    assert late is not None and late.state == JobState.COMPLETED and not late.cancel_requested


async def test_credits_move_exactly_in_micro_credits(store: JobStore) -> None:
    key = make_key_record("gina", new_key(), credits=1.0)
    await store.add_key(key)
    jobs = [await store.submit(NewJob(model="kolors", params=params(), cost=0.1, key_id=key.id)) for _ in range(10)]
    assert (await store.get_key(key.id)).credits == 0.0  # type: ignore[union-attr]
    with pytest.raises(InsufficientFunds, match=r"^insufficient credits: need 0.1, have 0$"):
        await store.submit(NewJob(model="kolors", params=params(), cost=0.1, key_id=key.id))
    for job in jobs[:3]:
        await store.request_cancel(job.id)
    record = await store.get_key(key.id)
    assert record is not None and record.credits == 0.3, "not 0.30000000000000004"
    topped = await store.update_key(key.id, add_credits=57.68)
    assert topped is not None and topped.credits == 57.98
    assert sum(micro(e.amount) for e in await store.ledger(key.id)) == micro(57.98)


@pytest.mark.parametrize("delta", [-1.000001, -5.0, MAX_CREDITS])
async def test_add_credits_out_of_range_raises_and_changes_nothing(store: JobStore, delta: float) -> None:
    key = make_key_record("hal", new_key(), credits=1.0)
    await store.add_key(key)
    with pytest.raises(BalanceOutOfRange, match="add_credits: would make the balance"):
        await store.update_key(key.id, add_credits=delta, name="renamed", enabled=False)
    record = await store.get_key(key.id)
    assert record is not None and (record.credits, record.name, record.enabled) == (1.0, "hal", True)
    assert [e.kind for e in await store.ledger(key.id)] == ["topup"]
    emptied = await store.update_key(key.id, add_credits=-1.0)
    assert emptied is not None and emptied.credits == 0.0


async def test_credits_are_reserved_captured_and_refunded_through_the_ledger(store: JobStore) -> None:
    key = make_key_record("alice", new_key(), credits=3.0)
    await store.add_key(key)
    ok = await store.submit(NewJob(model="kolors", params=params(), cost=1.0, key_id=key.id))
    bad = await store.submit(NewJob(model="kolors", params=params(), cost=1.5, key_id=key.id))
    with pytest.raises(InsufficientFunds, match="need 1, have 0.5"):
        await store.submit(NewJob(model="kolors", params=params(), cost=1.0, key_id=key.id))
    lease1 = await store.claim("w", 30, 0.1)
    lease2 = await store.claim("w", 30, 0.1)
    assert lease1 is not None and lease2 is not None
    assert lease1.job.id == ok.id and lease2.job.id == bad.id
    assert await store.complete(lease1, [b"x"], "png", [1], {})
    assert await store.fail(lease2, "engine error")
    record = await store.get_key(key.id)
    assert record is not None and record.credits == pytest.approx(2.0)
    ledger = await store.ledger(key.id)
    assert [e.kind for e in ledger] == ["topup", "reserve", "reserve", "capture", "refund"]
    assert sum(e.amount for e in ledger) == pytest.approx(record.credits)


async def test_an_unlimited_key_is_metered_and_a_later_limit_keeps_balance_equal_to_the_ledger(
        store: JobStore) -> None:
    key = make_key_record("erin", new_key())  # credits None: unlimited
    await store.add_key(key)
    await store.submit(NewJob(model="kolors", params=params(), cost=2.0, key_id=key.id))
    lease = await store.claim("w", 30, 0.1)
    assert lease is not None and await store.complete(lease, [b"x"], "png", [1], {})
    assert [(e.kind, e.amount) for e in await store.ledger(key.id)] == [("reserve", -2.0), ("capture", 0.0)]
    assert (await store.get_key(key.id)).credits is None  # type: ignore[union-attr]
    limited = await store.update_key(key.id, credits=10.0)
    assert limited is not None and limited.credits == 10.0
    assert sum(e.amount for e in await store.ledger(key.id)) == pytest.approx(10.0)
    topped = await store.update_key(key.id, add_credits=5)
    assert topped is not None and topped.credits == 15.0
    assert sum(e.amount for e in await store.ledger(key.id)) == pytest.approx(15.0)


async def test_max_concurrency_and_queue_cap_refuse_without_storing(store: JobStore) -> None:
    key = make_key_record("bob", new_key(), max_concurrency=1)
    await store.add_key(key)
    await store.submit(NewJob(model="kolors", params=params(), key_id=key.id))
    with pytest.raises(TooManyRunning):
        await store.submit(NewJob(model="kolors", params=params(), key_id=key.id))
    assert await store.running_count(key.id) == 1
    await store.submit(NewJob(model="kolors", params=params()), queue_cap=2)
    with pytest.raises(QueueFull):
        await store.submit(NewJob(model="kolors", params=params()), queue_cap=2)
    assert (await store.stats()).queued == 2


async def test_submits_at_once_are_each_decided_alone_and_repeats_among_them_replay(store: JobStore) -> None:
    """Submits that arrive together (SQLite puts them in one transaction): the one the credits do not
    cover is refused and leaves no trace, the others are stored and charged, and a repeated
    Idempotency-Key among them is answered with its first job, a mismatched one refused."""
    key = make_key_record("ivy", new_key(), credits=1.0)
    await store.add_key(key)
    news = [NewJob(model="kolors", params=params(i), cost=0.3, key_id=key.id) for i in range(4)]
    first = NewJob(model="kolors", params=params(9), key_id=key.id, idempotency_key="k", request_hash="h")
    again = NewJob(model="kolors", params=params(9), key_id=key.id, idempotency_key="k", request_hash="h")
    other = NewJob(model="kolors", params=params(8), key_id=key.id, idempotency_key="k", request_hash="other")
    outcomes = await asyncio.gather(*(store.submit(n) for n in [*news, first, again, other]),
                                    return_exceptions=True)
    refused = [o for o in outcomes[:4] if isinstance(o, InsufficientFunds)]
    stored = [o for o in outcomes[:4] if isinstance(o, Job)]
    assert len(refused) == 1 and len(stored) == 3
    # the same key thrice: the first to reach the store wins (SQLite keeps the order they came in;
    # on Redis, a pool of connections may reorder them), its repeat replays it, the other is refused
    if isinstance(outcomes[6], IdempotencyMismatch):
        assert isinstance(outcomes[4], Job) and isinstance(outcomes[5], Job)
        assert outcomes[4].id == outcomes[5].id in (first.id, again.id)
    else:
        assert isinstance(outcomes[6], Job) and outcomes[6].id == other.id
        assert all(isinstance(o, IdempotencyMismatch) for o in outcomes[4:6]), outcomes[4:6]
    if type(store).__name__ == "SQLiteStore":
        assert outcomes[4].id == first.id  # type: ignore[union-attr]
    assert (await store.get_key(key.id)).credits == pytest.approx(0.1)  # type: ignore[union-attr]
    assert sum(micro(e.amount) for e in await store.ledger(key.id)) == micro(0.1)
    assert (await store.stats()).queued == 4
    for job in stored:
        assert await store.get(job.id) is not None


async def test_keys_are_found_by_hash_updated_and_deleted(store: JobStore) -> None:
    plain = new_key()
    key = make_key_record("carol", plain, admin=True)
    await store.add_key(key)
    found = await store.key_by_hash(hash_key(plain))
    assert found is not None and found.id == key.id and found.admin and found.credits is None
    assert await store.key_by_hash(hash_key(plain + "x")) is None
    updated = await store.update_key(key.id, enabled=False, add_credits=5, rate_limit="10/min")
    assert updated is not None and not updated.enabled and updated.credits == 5 and updated.rate_limit == "10/min"
    assert [k.id for k in await store.list_keys()] == [key.id]
    assert await store.delete_key(key.id)
    assert await store.get_key(key.id) is None
    assert not await store.delete_key(key.id)


async def test_history_is_the_callers_own_newest_first_with_a_cursor(store: JobStore) -> None:
    key = make_key_record("dave", new_key())
    await store.add_key(key)
    ids = [(await store.submit(NewJob(model="kolors", params=params(i), key_id=key.id))).id for i in range(5)]
    await store.submit(NewJob(model="kolors", params=params()))  # someone else's
    page1, cursor = await store.history(key.id, 3, None)
    assert [j.id for j in page1] == ids[::-1][:3] and cursor is not None
    page2, cursor2 = await store.history(key.id, 3, cursor)
    assert [j.id for j in page2] == ids[::-1][3:] and cursor2 is None
    # a cursor that is not a decimal numeral of at most 18 ASCII digits reads as "from the start"
    for odd in ("²", "٣", "9" * 23, "-1", "1e3", ""):
        page, _ = await store.history(key.id, 3, odd)
        assert [j.id for j in page] == ids[::-1][:3], odd


async def test_a_taken_job_id_or_key_raises_already_exists_and_changes_nothing(store: JobStore) -> None:
    plain = new_key()
    key = make_key_record("kim", plain, credits=5.0)
    await store.add_key(key)
    job = await store.submit(NewJob(model="kolors", params=params(), cost=1.0, key_id=key.id))
    with pytest.raises(AlreadyExists):
        await store.submit(NewJob(model="kolors", params=params(2), cost=1.0, key_id=key.id, id=job.id))
    same_id = make_key_record("same id", new_key(), credits=1.0)
    same_id.id = key.id
    for taken in (same_id, make_key_record("same key", plain, credits=1.0)):
        with pytest.raises(AlreadyExists) as refused:
            await store.add_key(taken)
        assert isinstance(refused.value, StoreError)
    got = await store.get(job.id)
    assert got is not None and got.params == params() and got.version == job.version
    record = await store.key_by_hash(hash_key(plain))
    assert record is not None and record.id == key.id and record.name == "kim" and record.credits == 4.0
    assert [k.id for k in await store.list_keys()] == [key.id]
    assert [e.kind for e in await store.ledger(key.id)] == ["topup", "reserve"]
    assert await store.running_count(key.id) == 1 and (await store.stats()).queued == 1


async def test_workers_alive_and_shared_secret(store: JobStore) -> None:
    await store.worker_alive("w1", 5)
    await store.worker_alive("w2", 5)
    await store.worker_alive("w2", 0)
    assert (await store.stats()).workers_alive == 1
    secret = await store.shared_secret()
    assert len(secret) >= 32 and await store.shared_secret() == secret
    assert await store.ping()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param.endswith("-s3"):
        request.getfixturevalue("moto_s3")
    return str(request.param)


async def test_the_state_watch_fails_a_change_that_transitions_do_not_allow(tmp_path: Path) -> None:
    from kolors_api.jobs.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "db.sqlite3")
    watch = StateWatch(store)
    try:
        job = await store.submit(NewJob(model="kolors", params=params()))
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and await store.fail(lease, "boom")
        assert watch.pairs == {(JobState.QUEUED, JobState.PROCESSING), (JobState.PROCESSING, JobState.FAILED)}
        with closing(sqlite3.connect(tmp_path / "db.sqlite3")) as db:  # a bug: a failed job queued again
            db.execute("UPDATE jobs SET state='QUEUED', version=version+1 WHERE id=?", (job.id,))
            db.commit()
        with pytest.raises(AssertionError, match="FAILED -> QUEUED is not in TRANSITIONS"):
            await store.get(job.id)
    finally:
        await store.close()


# -- Idempotency-Key and the webhook outbox
def keyed(key_id: str, idem: str, digest: str = "h1", **kw: object) -> NewJob:
    return NewJob(model="kolors", params=params(), cost=1.0, key_id=key_id, idempotency_key=idem,
                  request_hash=digest, **kw)  # type: ignore[arg-type]


async def test_a_repeated_idempotency_key_answers_the_first_job_and_charges_once(store: JobStore) -> None:
    key = make_key_record("user", new_key(), credits=10)
    await store.add_key(key)
    assert await store.idempotent_request(key.id, "k-1") is None
    first = await store.submit(keyed(key.id, "k-1"))
    assert await store.idempotent_request(key.id, "k-1") == (first.id, "h1")
    assert await store.idempotent_request("another key", "k-1") is None
    again = await store.submit(keyed(key.id, "k-1"))
    assert again.id == first.id
    with pytest.raises(IdempotencyMismatch):
        await store.submit(keyed(key.id, "k-1", "another body"))
    other = await store.submit(keyed(key.id, "k-2"))  # another key: another job
    assert other.id != first.id
    reserves = [e for e in await store.ledger(key.id) if e.kind == "reserve"]
    assert sorted(e.request_id for e in reserves) == sorted([first.id, other.id])
    got = await store.get_key(key.id)
    assert got is not None and got.credits == 8


async def test_twenty_concurrent_submits_with_one_idempotency_key_make_one_job(store: JobStore) -> None:
    key = make_key_record("user", new_key(), credits=100)
    await store.add_key(key)
    jobs = await asyncio.gather(*(store.submit(keyed(key.id, "same")) for _ in range(20)))
    assert len({j.id for j in jobs}) == 1
    assert (await store.stats()).queued == 1
    assert [e.kind for e in await store.ledger(key.id)].count("reserve") == 1


def hooked(events: tuple[str, ...] = ("completed",)) -> NewJob:
    return NewJob(model="kolors", params=params(), key_id="k1", webhook="http://127.0.0.1:9/hook",
                  webhook_events=events)


async def test_the_outbox_gets_the_events_the_webhook_asks_for(store: JobStore) -> None:
    plain = await store.submit(NewJob(model="kolors", params=params()))
    job = await store.submit(hooked(("start", "progress", "completed")))
    for _ in range(2):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None
        await store.progress(lease, 1, 2)
        await store.progress(lease, 2, 2)  # the progress delivery still waits: no second one
        assert await store.complete(lease, [b"img"], "png", [1], {})
    due = await store.claim_webhooks(30, 10)
    assert sorted(d.event for d in due) == ["completed", "progress", "start"]
    assert {d.job_id for d in due} == {job.id} and plain.id not in {d.job_id for d in due}
    assert all(d.attempt == 1 and d.url == "http://127.0.0.1:9/hook" and d.key_id == "k1" for d in due)
    assert await store.claim_webhooks(30, 10) == []  # claimed: not due again while the lease runs


async def test_a_failed_job_is_delivered_only_when_asked_for(store: JobStore) -> None:
    default = await store.submit(hooked())
    failing = await store.submit(hooked(("failed",)))
    for _ in range(2):
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and await store.fail(lease, "boom")
    due = await store.claim_webhooks(30, 10)
    assert [(d.job_id, d.event) for d in due] == [(failing.id, "failed")]
    assert default.id != failing.id


async def test_a_webhook_attempt_is_logged_retried_when_due_and_fenced(store: JobStore) -> None:
    job = await store.submit(hooked())
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and await store.complete(lease, [b"img"], "png", [1], {})
    (first,) = await store.claim_webhooks(30, 10)
    t = time.time()
    attempt = WebhookAttempt(first.id, "completed", 1, t, 500, 0.01, "HTTP 500")
    assert await store.record_webhook(first, attempt, "pending", t + 0.3)
    assert not await store.record_webhook(first, attempt, "pending", t)  # the claim was used up
    assert await store.claim_webhooks(30, 10) == []
    await asyncio.sleep(0.4)
    (second,) = await store.claim_webhooks(0.2, 10)
    assert second.id == first.id and second.attempt == 2
    await asyncio.sleep(0.3)  # its runner died: due again after the lease
    (third,) = await store.claim_webhooks(30, 10)
    assert third.attempt == 3
    late = WebhookAttempt(second.id, "completed", 2, t, 200, 0.01)
    assert not await store.record_webhook(second, late, "delivered")  # stale: the delivery was re-claimed
    assert await store.record_webhook(third, WebhookAttempt(third.id, "completed", 3, t, 200, 0.02), "delivered")
    assert [(a.attempt, a.status) for a in await store.webhook_attempts(job.id)] == [(1, 500), (3, 200)]
    assert await store.claim_webhooks(30, 10) == []


async def test_a_410_stops_every_delivery_of_that_job(store: JobStore) -> None:
    job = await store.submit(hooked(("start", "progress", "completed")))
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None
    (start,) = await store.claim_webhooks(30, 10)
    await store.progress(lease, 1, 2)
    assert await store.record_webhook(start, WebhookAttempt(start.id, "start", 1, time.time(), 410, 0.01),
                                      "stopped")
    assert await store.complete(lease, [b"img"], "png", [1], {})
    assert await store.claim_webhooks(30, 10) == []  # the waiting progress and the completion: stopped
    assert [a.status for a in await store.webhook_attempts(job.id)] == [410]


async def test_a_keys_webhook_secret_is_made_once_and_rotates(store: JobStore) -> None:
    secret = await store.webhook_secret("k1")
    assert secret.startswith("whsec_") and await store.webhook_secret("k1") == secret
    assert await store.webhook_secret("k2") != secret
    rotated = await store.rotate_webhook_secret("k1")
    assert rotated != secret and await store.webhook_secret("k1") == rotated
    # the read-only look (event streams re-check it) makes nothing
    assert await store.current_webhook_secret("k1") == rotated
    assert await store.current_webhook_secret("k3") is None and await store.current_webhook_secret("k3") is None
