"""Image to image in a fleet: an API replica and a worker process on a real Redis, the input picture kept
in Redis or on S3 (moto on loopback), stored once with the job, read by the worker, deleted at expiry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, flushed_redis, redis_db_url, start_process, start_server, wait_for_status
from tests.pictures import b64, picture

redis = pytest.importorskip("redis")
keys = pytest.importorskip("kolors_api.jobs.redis_keys")

DB_URL = os.environ.get("KOLORS_API_TEST_IMG2IMG_REDIS", redis_db_url(9))
PNG = picture(96, 80)
SHA = hashlib.sha256(PNG).hexdigest()
RETENTION = {"KOLORS_API_RETENTION_SECONDS": "3"}


@pytest.fixture
def rdb() -> Iterator[redis.Redis]:
    yield from flushed_redis(DB_URL)


@pytest.fixture(params=["redis", "s3"])
def blob_url(request: pytest.FixtureRequest) -> str | None:
    """Where the fleet keeps pictures: in Redis (None), or on S3 (moto on loopback)."""
    return None if request.param == "redis" else str(request.getfixturevalue("s3_url"))


def s3_keys(url: str) -> list[str]:
    import boto3

    parts = urlsplit(url)
    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=parts.netloc, Prefix=parts.path.strip("/") + "/")
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_img2img_end_to_end_with_the_input_stored_once_and_deleted_at_expiry(
        tiny_model: Path, tmp_path: Path, rdb: redis.Redis, blob_url: str | None) -> None:
    blob_args = ["--blob-url", blob_url] if blob_url else []
    api: LiveServer = start_server(tiny_model, tmp_path / "api", env=RETENTION, ready=False,
                                   extra=["--store", DB_URL, "--no-worker", *blob_args])
    worker: subprocess.Popen[bytes] | None = None
    try:
        worker, _ = start_process(["worker", "--store", DB_URL, "--model", str(tiny_model),
                                   "--data-dir", str(tmp_path / "worker"), *blob_args],
                                  tmp_path / "worker", RETENTION, "worker.log")
        r = httpx.post(f"{api.url}/v2/kolors-img2img", headers=api.headers(), timeout=60,
                       json={"prompt": "a fox", "image": b64(PNG), "steps": 2, "strength": 0.5, "width": 512,
                             "height": 512, "output_format": "png"})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        record = rdb.hgetall(f"{keys.DEFAULT_PREFIX}{keys.JOB}{rid}")
        assert PNG not in b"".join(record.values()) and SHA.encode() in record[b"params"]
        if blob_url is None:
            assert rdb.hgetall(f"{keys.DEFAULT_PREFIX}{keys.INPUT}{rid}") == {SHA.encode(): PNG}
        else:
            assert [k for k in s3_keys(blob_url) if "/inputs/" in k] == [f"outputs/{rid}/inputs/{SHA}"]
        wait_for_status(api, api.key, rid, lambda s: s["status"] == "COMPLETED")
        result = httpx.get(f"{api.url}/v2/requests/{rid}", headers=api.headers()).json()
        assert result["input"]["image"] == SHA
        assert httpx.get(result["output"][0]).content[:8] == b"\x89PNG\r\n\x1a\n"
        deadline = time.monotonic() + 60  # retention 3 s, the sweep every second
        while time.monotonic() < deadline:
            gone = httpx.get(f"{api.url}/v2/requests/{rid}/status", headers=api.headers()).status_code == 404
            stored = (rdb.exists(f"{keys.DEFAULT_PREFIX}{keys.INPUT}{rid}") if blob_url is None
                      else [k for k in s3_keys(blob_url) if f"/{rid}/" in k])
            if gone and not stored:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the input outlived the job:\n{api.log()[-2000:]}")
    finally:
        api.stop()
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=60)
