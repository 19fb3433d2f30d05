"""Fleet chaos: a worker SIGKILLed mid-job over two API replicas; nothing lost, nothing completed or
charged twice (split from tests/test_fleet.py, its fixtures, so that xdist runs it beside the rest)."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.pixel_engines import Gate
from tests.test_fleet import (  # noqa: F401 - the fleet fixtures
    DB_URL,
    SMALL,
    Fleet,
    create_key,
    fleet,
    images,
    keys,
    parent_pid,
    rdb,
    redis,
    s3_keys,
    wait_all,
)


def test_chaos_sigkill_a_worker_mid_job_loses_nothing_and_completes_nothing_twice(
        fleet: Fleet, rdb: redis.Redis, images: str | None) -> None:  # noqa: F811 - the imported fixtures
    a, b = fleet.api(), fleet.api()
    # The victim is job 0: it waits at a gate after its first step (the `gate` engine), so the kill
    # surely lands mid-job, with the other 39 jobs queued or running; the gate opens for its second
    # delivery. The one fleet test on the tiny pipeline (images in Redis): real denoising, killed for
    # real; with images on S3, where they go is the point, on the torch-free engine.
    gate = Gate(fleet.root / "gate")
    w1, w2 = (fleet.worker(gate.env, engine="gate", tiny=images is None) for _ in range(2))
    fleet.wait_workers(2)
    key_id, key = create_key(a)

    def prompt(i: int) -> str:
        return f"chaos job {i}" + (" hold:victim" if i == 0 else "")

    def submit(i: int) -> str:
        api = (a, b)[i % 2]
        r = httpx.post(api.url + "/v2/kolors", headers={"x-api-key": key},
                       json={"prompt": prompt(i), "seed": 1000 + i, **SMALL}, timeout=30)
        assert r.status_code == 200, r.text
        return str(r.json()["request_id"])

    ids = [submit(0)]
    with ThreadPoolExecutor(8) as pool:
        ids += pool.map(submit, range(1, 40))
    gate.wait_held("victim")
    victim_job = ids[0]
    holder = rdb.hget(keys.DEFAULT_PREFIX + keys.JOB + victim_job, "lease_worker")
    assert holder is not None
    victim_pid = parent_pid(int(holder.decode().rsplit("-", 2)[1]))  # the engine process's worker
    assert victim_pid in {w1.pid, w2.pid}
    os.kill(victim_pid, signal.SIGKILL)
    killed = w1 if w1.pid == victim_pid else w2
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    gate.open("victim")

    finished = wait_all(b, key, ids)
    assert {body["status"] for body in finished.values()} == {"COMPLETED"}, finished
    for i, request_id in enumerate(ids):
        result = httpx.get(f"{a.url}/v2/requests/{request_id}", headers={"x-api-key": key}).json()
        assert result["seeds"] == [1000 + i] and len(result["output"]) == 1
        assert result["input"]["prompt"] == prompt(i)
        assert httpx.get(result["output"][0]).content[:4] == b"\x89PNG"
    # exactly one capture per job: nothing completed twice, nothing charged twice
    import asyncio

    from kolors_api.jobs.redis import RedisStore

    async def ledger() -> tuple[list[str], int, int]:
        store = RedisStore(DB_URL)
        await store.open()
        try:
            entries = await store.ledger(key_id)
            job = await store.get(victim_job)
            stats = await store.stats()
            assert job is not None
            return [e.request_id for e in entries if e.kind == "capture"], job.deliveries, stats.reclaims
        finally:
            await store.close()

    captures, victim_deliveries, reclaims = asyncio.run(ledger())
    assert sorted(captures) == sorted(ids)
    assert victim_deliveries == 2 and reclaims >= 1
    account = httpx.get(a.url + "/v1/account", headers={"x-api-key": key}).json()
    assert account["credits"] == pytest.approx(100 - 40 * 0.02)
    survivor = w2 if killed is w1 else w1
    assert survivor.poll() is None
    if images is not None:  # every job's image is on S3, none in Redis
        assert {key.split("/")[1] for key in s3_keys(images)} == set(ids)
        assert not rdb.keys(keys.DEFAULT_PREFIX + "out:*")
        assert not [k for k in rdb.keys(keys.DEFAULT_PREFIX + keys.JOB + "*") if rdb.hexists(k, "out:0")]
