"""Output images on S3 (`--blob-url s3://bucket/prefix`), against moto's S3 server on loopback through
the production client code: visibility only with the lease-fenced commit, presigned redirects, the
start-up check, and an S3 outage (503 with Retry-After, one log line, the job delivered again).
The behaviour every store shares runs in tests/test_store.py (its `sqlite-s3` and `redis-s3` backends).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from kolors_api.jobs import JobState, NewJob
from kolors_api.jobs.blobs_s3 import S3Blobs
from kolors_api.jobs.outage import BlobUnavailable, is_outage
from tests.conftest import LiveServer, free_port, redis_db_url, start_process, start_server, wait_for_status
from tests.pixel_engines import serving
from tests.s3_helpers import MotoS3, start_moto
from tests.test_store import drop, make, params

SMALL = {"prompt": "a fox in the snow", "steps": 2, "width": 512, "height": 512, "output_format": "png"}


def bucket_of(url: str) -> str:
    return urlsplit(url).netloc


@pytest.mark.parametrize("backend", ["sqlite-s3", "redis-s3"])
async def test_images_of_a_delivery_that_never_committed_are_never_served_and_go_with_expiry(
        backend: str, moto_s3: MotoS3, tmp_path: Path) -> None:
    store = await make(backend, tmp_path, retention=0.5)
    try:
        blobs = store.blobs  # type: ignore[attr-defined]
        assert isinstance(blobs, S3Blobs)
        job = await store.submit(NewJob(model="kolors", params=params()))
        killed = await store.claim("w1", 0.2, 0.1)
        assert killed is not None
        # the first worker uploads, then dies before its commit: nothing of it is readable
        await asyncio.to_thread(blobs.write_pending, job.id, killed.token, [b"orphan"], "png")
        assert await store.read_output(job.id, 0) is None and await store.output_url(job.id, 0) is None
        await asyncio.sleep(0.3)
        winner = await store.claim("w2", 30, 1)
        assert winner is not None and winner.job.id == job.id and winner.delivery == 2
        # the dead worker's late commit is refused, and takes its objects with it
        assert not await store.complete(killed, [b"late"], "png", [1], {})
        assert await store.complete(winner, [b"winner"], "png", [1], {})
        assert await store.read_output(job.id, 0) == b"winner"
        assert blobs.names(job.id) == sorted([f"{killed.token}/0.png", f"{winner.token}/0.png"])
        await asyncio.sleep(0.7)
        assert await store.expire() == 1
        assert blobs.names(job.id) == []  # the orphan went with the job
    finally:
        await drop(store)


@pytest.mark.parametrize("backend", ["sqlite-s3", "redis-s3", "redis-blobs"])
async def test_output_url_is_a_presigned_get_valid_no_longer_than_the_retention(
        backend: str, moto_s3: MotoS3, tmp_path: Path) -> None:
    store = await make(backend, tmp_path, retention=120)
    try:
        job = await store.submit(NewJob(model="kolors", params=params()))
        lease = await store.claim("w1", 30, 0.1)
        assert lease is not None and await store.complete(lease, [b"\x89PNG one"], "png", [1], {})
        url = await store.output_url(job.id, 0)
        if backend == "redis-blobs":
            assert url is None  # files: nothing to presign, the API streams them
            return
        assert url is not None and await store.output_url(job.id, 1) is None
        query = parse_qs(urlsplit(url).query)
        assert 100 <= int(query["X-Amz-Expires"][0]) <= 120
        r = httpx.get(url)
        assert r.status_code == 200 and r.content == b"\x89PNG one" and r.headers["content-type"] == "image/png"
    finally:
        await drop(store)


async def test_an_upload_during_an_s3_outage_is_not_committed_and_the_job_is_delivered_again(
        moto_s3: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kolors_api.jobs.sqlite import SQLiteStore

    bucket = moto_s3.bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    store = SQLiteStore(tmp_path / "db.sqlite3", blobs=S3Blobs(f"s3://{bucket}/o"))
    try:
        job = await store.submit(NewJob(model="kolors", params=params()))
        lease = await store.claim("w1", 3.0, 0.1)
        assert lease is not None
        claimed = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="kolors_api.jobs.blobs_s3"):
            for _ in range(2):
                with pytest.raises(BlobUnavailable) as raised:
                    await store.complete(lease, [b"img"], "png", [1], {})
                assert is_outage(raised.value)
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1  # one line an outage
        got = await store.get(job.id)
        assert got is not None and got.state == JobState.PROCESSING  # nothing committed, nothing charged
        await asyncio.sleep(max(0.0, claimed + 3.1 - time.monotonic()))  # its lease runs out
        again = await store.claim("w2", 30, 1)
        assert again is not None and again.job.id == job.id and again.delivery == 2
    finally:
        await store.close()


def run_cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "kolors_api.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, **env})


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_missing_bucket_or_a_dead_endpoint_refuses_to_start_in_one_line(
        command: str, moto_s3: MotoS3, tmp_path: Path) -> None:
    args = [command, "--data-dir", str(tmp_path), "--port", str(free_port())] if command == "serve" else \
        [command, "--store", redis_db_url(15), "--data-dir", str(tmp_path)]
    missing = run_cli([*args, "--blob-url", "s3://no-such-bucket-here/x"], {}, tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"kolors-api: blob store s3://no-such-bucket-here/x (endpoint {moto_s3.endpoint}): "
        f"bucket 'no-such-bucket-here' does not exist"]
    dead = run_cli([*args, "--blob-url", f"s3://{moto_s3.bucket()}/x"],
                   {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, tmp_path)
    assert dead.returncode == 2
    lines = dead.stderr.strip().splitlines()
    assert len(lines) == 1 and "EndpointConnectionError" in lines[0], dead.stderr


def test_an_s3_url_without_boto3_names_the_s3_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['boto3'] = None; from kolors_api.cli import main; "
            f"sys.exit(main(['worker', '--store', '{redis_db_url(15)}', '--blob-url', 's3://b/p']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "kolors-api: an s3:// blob URL needs the `s3` extra, which is not installed (module 'boto3' is "
        "missing): pip install -e '.[s3]' in the checkout"]


def submit(srv: LiveServer, body: dict[str, object], key: str | None = None) -> str:
    r = httpx.post(srv.url + "/v2/kolors", headers=srv.headers(key), json=body, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def test_embedded_serve_keeps_images_on_s3_streamed_or_redirected(tmp_path: Path, moto_s3: MotoS3,
                                                                   s3_url: str) -> None:
    srv = start_server("tiny", tmp_path / "srv", **serving(extra=["--blob-url", s3_url],
                                                          env={"KOLORS_API_RETENTION_SECONDS": "600"}))
    try:
        request_id = submit(srv, SMALL)
        wait_for_status(srv, srv.key, request_id, lambda b: b["status"] == "COMPLETED")
        output = httpx.get(f"{srv.url}/v2/requests/{request_id}", headers=srv.headers()).json()["output"][0]
        streamed = httpx.get(output)
        assert streamed.status_code == 200 and streamed.content[:4] == b"\x89PNG"
        keys = moto_s3.keys(bucket_of(s3_url))
        assert len(keys) == 1 and keys[0].startswith(f"outputs/{request_id}/") and keys[0].endswith("/0.png")
        assert not (tmp_path / "srv" / "outputs").exists()  # nothing on the local disk
    finally:
        srv.stop()
    redirecting = start_server("tiny", tmp_path / "srv", port=urlsplit(srv.url).port, **serving(
        extra=["--blob-url", s3_url], env={"KOLORS_API_BLOB_REDIRECT": "1", "KOLORS_API_RETENTION_SECONDS": "600"}))
    try:
        r = httpx.get(output)
        assert r.status_code == 302 and r.headers["location"].startswith(moto_s3.endpoint + "/")
        assert int(parse_qs(urlsplit(r.headers["location"]).query)["X-Amz-Expires"][0]) <= 600
        assert httpx.get(r.headers["location"]).content == streamed.content
        assert httpx.get(output + "x").status_code == 401  # a broken signature still opens nothing
    finally:
        redirecting.stop()


def test_an_s3_outage_is_503_logged_once_and_the_job_in_hand_is_delivered_again(tmp_path: Path) -> None:
    s3 = start_moto()  # a server of this test's own, stopped and started again under the running API
    bucket = s3.bucket()
    srv = start_server("tiny", tmp_path / "srv", **serving(
        extra=["--blob-url", f"s3://{bucket}/o"],
        env={**s3.env, "KOLORS_API_LEASE_SECONDS": "2", "KOLORS_API_HEARTBEAT_SECONDS": "0.5",
             "KOLORS_API_MAX_DELIVERIES": "50"}))
    try:
        user = srv.create_key(credits=10)
        first = submit(srv, SMALL, user["key"])
        wait_for_status(srv, user["key"], first, lambda b: b["status"] == "COMPLETED")
        output = httpx.get(f"{srv.url}/v2/requests/{first}", headers=srv.headers(user["key"])).json()["output"][0]
        s3.stop()
        for _ in range(3):
            r = httpx.get(output, timeout=60)
            assert r.status_code == 503 and r.json() == {"error": "store unavailable: try again shortly"}
            assert int(r.headers["retry-after"]) >= 1
        second = submit(srv, {**SMALL, "seed": 7}, user["key"])
        deadline = time.monotonic() + 120
        while "could not be stored" not in srv.log():
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.2)
        assert httpx.get(f"{srv.url}/v2/requests/{second}/status", headers=srv.headers(user["key"])).json()[
            "status"] != "COMPLETED"
        s3.start()
        wait_for_status(srv, user["key"], second, lambda b: b["status"] == "COMPLETED", timeout=120)
        result = httpx.get(f"{srv.url}/v2/requests/{second}", headers=srv.headers(user["key"])).json()
        assert httpx.get(result["output"][0]).content[:4] == b"\x89PNG"
        assert httpx.get(output).status_code == 200
        # each job charged once: 2 × 0.02 credits (512², 2 steps)
        account = httpx.get(srv.url + "/v1/account", headers=srv.headers(user["key"])).json()
        assert account["credits"] == pytest.approx(10 - 2 * 0.02)
        down = [line for line in srv.log().splitlines() if f"blob store s3://{bucket}/o unavailable" in line]
        # once per process that met it: the API's (reads) and the engine process's (its upload)
        api, engine = [line for line in down if "[engine " not in line], [line for line in down if "[engine " in line]
        assert len(api) == 1 and len(engine) <= 1, srv.log()[-3000:]
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
        s3.stop()


def test_a_worker_with_an_s3_blob_url_refuses_a_store_url_it_cannot_parse(tmp_path: Path) -> None:
    bad = run_cli(["worker", "--store", "redis://127.0.0.1:1/0", "--blob-url", "http://bucket/x"], {}, tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("kolors-api: blob_url (flag --blob-url, env KOLORS_API_BLOB_URL): expected "
                                  "s3://BUCKET[/PREFIX] or file:///PATH, got 'http://bucket/x'")


def test_a_worker_finds_its_bucket_through_the_standard_aws_settings_alone(tmp_path: Path, moto_s3: MotoS3) -> None:
    """The worker process finds moto through the standard AWS_* settings alone (no flag of ours)."""
    bucket = moto_s3.bucket()
    proc, log = start_process(["worker", "--store", redis_db_url(15), "--blob-url", f"s3://{bucket}/p",
                               "--engine", "no.such.module:factory"], tmp_path, {})
    assert proc.wait(timeout=60) == 2
    text = log.read_text()
    assert "blob store" not in text  # the bucket check passed; the engine path is what is refused


def test_s3_errors_that_mean_not_now_are_told_from_bugs() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError, ReadTimeoutError

    from kolors_api.jobs.blobs_s3 import is_down

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_down(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_down(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_down(client_error(503, "SlowDown")) and is_down(client_error(500, "InternalError"))
    assert is_down(client_error(403, "InvalidAccessKeyId")) and is_down(client_error(404, "NoSuchBucket"))
    assert not is_down(client_error(400, "InvalidArgument"))
    assert not is_down(ParamValidationError(report="Bucket: missing"))
    assert not is_down(ValueError("a bug"))


@pytest.mark.parametrize("backend", ["sqlite-s3", "redis-s3"])
async def test_expiry_sweeps_images_no_job_names_and_leaves_other_keys_alone(
        backend: str, moto_s3: MotoS3, tmp_path: Path) -> None:
    store = await make(backend, tmp_path, retention=0.5)
    try:
        blobs = store.blobs  # type: ignore[attr-defined]
        assert isinstance(blobs, S3Blobs)
        blobs.sweep_margin, blobs.sweep_every = 0.0, 0.0  # production: an hour, every ten minutes
        # what an expiry during an S3 outage leaves: images of a job no store knows any more
        lost, token = uuid.uuid4().hex, uuid.uuid4().hex
        await asyncio.to_thread(blobs.write_pending, lost, token, [b"a", b"b"], "webp")
        client = moto_s3.client()
        for key in ("outputs/notes.txt", "elsewhere/x.png"):  # not ours: never touched
            client.put_object(Bucket=blobs.bucket, Key=key, Body=b"keep")
        job = await store.submit(NewJob(model="kolors", params=params()))
        assert blobs.names(lost) == [f"{token}/0.webp", f"{token}/1.webp"]
        await asyncio.sleep(2.1)  # S3 keeps times to the second
        assert await store.expire() == 0  # no job expired; the sweep ran all the same
        assert blobs.names(lost) == []
        assert moto_s3.keys(blobs.bucket) == ["elsewhere/x.png", "outputs/notes.txt"]
        assert await store.get(job.id) is not None
    finally:
        await drop(store)


def test_wrong_credentials_refuse_to_start_in_one_line(tmp_path: Path) -> None:
    s3 = start_moto()  # its own server; moto then checks every request's key (none is known to it)
    bucket = s3.bucket()
    assert httpx.post(f"{s3.endpoint}/moto-api/reset-auth", content=b"0").status_code == 200
    try:
        r = run_cli(["worker", "--store", redis_db_url(15), "--blob-url", f"s3://{bucket}/x"],
                    {**s3.env, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"}, tmp_path)
    finally:
        httpx.post(f"{s3.endpoint}/moto-api/reset-auth", content=b"inf")  # moto's setting is process-wide
        s3.stop()
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"kolors-api: blob store s3://{bucket}/x (endpoint {s3.endpoint}): the access key is unknown "
        f"(AWS_ACCESS_KEY_ID)"]
