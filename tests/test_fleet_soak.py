"""Fleet soak: three waves over two API replicas and two workers, every output served, each job charged
once, and the replicas' expiry sweep removing the images after retention (split from
tests/test_fleet.py, its fixtures, so that xdist runs it beside the rest)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_fleet import SMALL, Fleet, create_key, fleet, images, keys, rdb, redis, stored_images, wait_all  # noqa: F401 - the fleet fixtures


def test_soak_every_output_is_served_each_job_charged_once_and_retention_removes_the_images(
        fleet: Fleet, rdb: redis.Redis, images: str | None) -> None:  # noqa: F811 - the imported fixtures
    # long enough for a wave to be checked after its first job ends, short enough not to be waited out
    retention = {"KOLORS_API_RETENTION_SECONDS": "12"}
    a, b = fleet.api(retention), fleet.api(retention)
    fleet.worker(retention)
    fleet.worker(retention)
    fleet.wait_workers(2)
    key_id, key = create_key(a)
    every: list[str] = []
    for wave in range(3):
        def submit(i: int, wave: int = wave) -> str:
            r = httpx.post((a, b)[i % 2].url + "/v2/kolors", headers={"x-api-key": key}, timeout=30,
                           json={"prompt": f"soak {wave}.{i}", "seed": 100 * wave + i, **SMALL})
            assert r.status_code == 200, r.text
            return str(r.json()["request_id"])

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(submit, range(8)))
        sync = httpx.post(b.url + "/v1/kolors", headers={"x-api-key": key}, timeout=120,
                          json={"prompt": f"soak sync {wave}", **SMALL})
        assert sync.status_code == 200 and sync.content[:4] == b"\x89PNG"
        ids.append(sync.headers["x-request-id"])
        assert {body["status"] for body in wait_all(a, key, ids).values()} == {"COMPLETED"}
        assert set(ids) <= stored_images(rdb, images)  # where the fleet was told to keep them
        for request_id in ids:
            result = httpx.get(f"{b.url}/v2/requests/{request_id}", headers={"x-api-key": key}).json()
            assert httpx.get(result["output"][0]).content[:4] == b"\x89PNG"
        every += ids
    if images is not None:
        assert not rdb.keys(keys.DEFAULT_PREFIX + "out:*")  # no image ever went to Redis
        assert not [k for k in rdb.keys(keys.DEFAULT_PREFIX + keys.JOB + "*") if rdb.hexists(k, "out:0")]
    account = httpx.get(a.url + "/v1/account", headers={"x-api-key": key}).json()
    assert account["credits"] == pytest.approx(100 - len(every) * 0.02)  # each job charged once
    deadline = time.monotonic() + 90  # retention, then the replicas' expiry sweep deletes the images
    while stored_images(rdb, images):
        assert time.monotonic() < deadline, sorted(stored_images(rdb, images))[:5]
        time.sleep(1)
    assert httpx.get(f"{a.url}/v2/requests/{every[0]}/status", headers={"x-api-key": key}).status_code == 404
