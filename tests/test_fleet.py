"""Fleet mode: API replicas and worker processes sharing a real Redis; processes are killed for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, flushed_redis, free_port, redis_db_url, start_process, start_server
from tests.engines import ENGINE_ENV

redis = pytest.importorskip("redis")
keys = pytest.importorskip("kolors_api.jobs.redis_keys")

# A db of its own; the env names another where several checkouts share one Redis.
DB_URL = os.environ.get("KOLORS_API_TEST_FLEET_REDIS", redis_db_url(13))
LEASES = keys.DEFAULT_PREFIX + keys.LEASES
DEAD = keys.DEFAULT_PREFIX + keys.DEAD_LETTERS
SMALL = {"steps": 2, "width": 512, "height": 512, "output_format": "png"}
FAST_LEASE = {"KOLORS_API_LEASE_SECONDS": "3", "KOLORS_API_HEARTBEAT_SECONDS": "0.5"}


@pytest.fixture
def rdb() -> Iterator[redis.Redis]:
    yield from flushed_redis(DB_URL)


class Fleet:
    def __init__(self, tiny_model: Path | Callable[[], Path], root: Path) -> None:
        #: The tiny pipeline's folder, or a callable that builds it on first use (only a `tiny=True`
        #: worker needs it; the API replicas load no model).
        self._tiny_model = tiny_model
        self.root = root
        #: Flags every API replica and worker gets: where the images go (default: in Redis).
        self.blob_args: list[str] = []
        self.apis: list[LiveServer] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def tiny_model(self) -> Path:
        return self._tiny_model if isinstance(self._tiny_model, Path) else self._tiny_model()

    def api(self, env: dict[str, str] | None = None) -> LiveServer:
        n = len(self.apis)
        srv = start_server("tiny", self.root / f"api{n}", env=env, ready=False,
                           extra=["--store", DB_URL, "--no-worker", *self.blob_args])
        self.apis.append(srv)
        return srv

    def worker(self, env: dict[str, str] | None = None, *, engine: str | None = None,
               extra: tuple[str, ...] = (), tiny: bool = False) -> subprocess.Popen[bytes]:
        """A `kolors-api worker` on a torch-free engine of tests/pixel_engines.py (`engine`, default
        `pixels`): up in about a second. `tiny=True`: on the tiny Kolors pipeline instead, wrapped
        by `engine` of tests/engines.py when given (where the pixels are the point)."""
        n = len(self.workers)
        if tiny:
            engine_args = ["--engine", f"tests.engines:{engine}"] if engine else []
        else:
            engine_args = ["--engine", f"tests.pixel_engines:{engine or 'pixels'}"]
        proc, _ = start_process(["worker", "--store", DB_URL, "--model", str(self.tiny_model) if tiny else "tiny",
                                 "--data-dir", str(self.root / f"worker{n}"), *engine_args, *self.blob_args, *extra],
                                self.root / f"worker{n}", {**FAST_LEASE, **ENGINE_ENV, **(env or {})}, "worker.log")
        self.workers.append(proc)
        return proc

    def wait_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = httpx.get(self.apis[0].url + "/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("kolors_workers_alive "))
            if float(line.split()[1]) >= count:
                return
            time.sleep(0.2)
        raise AssertionError(f"{count} workers never came alive:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.root.glob("*/*.log"))

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for srv in self.apis:
            srv.stop()


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, rdb: redis.Redis) -> Iterator[Fleet]:
    f = Fleet(lambda: Path(request.getfixturevalue("tiny_model")), tmp_path)
    yield f
    f.close()


@pytest.fixture(params=["redis", "s3"])
def images(request: pytest.FixtureRequest, fleet: Fleet) -> str | None:
    """Where the fleet keeps images: in Redis (None), or on S3 (moto on loopback): its s3:// URL."""
    if request.param == "redis":
        return None
    url = str(request.getfixturevalue("s3_url"))
    fleet.blob_args = ["--blob-url", url]
    return url


def create_key(api: LiveServer, credits: float = 100.0) -> tuple[str, str]:
    made = api.create_key(name="chaos", credits=credits)
    return made["id"], made["key"]


def status(api: LiveServer, key: str, request_id: str) -> dict[str, object]:
    return httpx.get(f"{api.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}, timeout=10).json()


def wait_all(api: LiveServer, key: str, ids: list[str], timeout: float = 300) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline and len(done) < len(ids):
        for request_id in ids:
            if request_id not in done:
                body = status(api, key, request_id)
                if body["status"] in ("COMPLETED", "FAILED"):
                    done[request_id] = body
        time.sleep(0.2)
    assert len(done) == len(ids), f"{len(ids) - len(done)} jobs never finished"
    return done


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (Linux), or None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def processing_pid(rdb: redis.Redis, pids: set[int], timeout: float = 60) -> tuple[int, str]:
    """The pid of a worker (of `pids`) whose engine process holds a lease right now, and its job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for member in rdb.zrange(LEASES, 0, 9):
            job_id = member.decode()
            holder = rdb.hget(keys.DEFAULT_PREFIX + keys.JOB + job_id, "lease_worker")
            if holder is None:
                continue
            pid = parent_pid(int(holder.decode().rsplit("-", 2)[1]))  # the engine process's worker
            if pid in pids:
                return pid, job_id
        time.sleep(0.02)
    raise AssertionError("no worker ever held a job")


def s3_keys(url: str) -> list[str]:
    """The object keys under an s3:// blob URL (moto's endpoint comes from the AWS_* env)."""
    import boto3

    parts = urlsplit(url)
    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=parts.netloc, Prefix=parts.path.strip("/") + "/")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def stored_images(rdb: redis.Redis, images: str | None) -> set[str]:
    """The job ids that have images stored: on S3 (`images` is its URL), or in Redis."""
    if images is not None:
        return {k.split("/")[1] for k in s3_keys(images)}
    stem = keys.DEFAULT_PREFIX + keys.JOB  # (images are fields of their job's hash)
    return {k.decode().removeprefix(stem) for k in rdb.keys(stem + "*") if rdb.hexists(k, "out:0")}


def test_a_step_slower_than_the_lease_with_heartbeats_is_not_run_twice(fleet: Fleet) -> None:
    a = fleet.api()
    # Each step outlasts the lease; ten heartbeats a lease keep it, even when a loaded machine delays some.
    slow = {"KOLORS_TEST_STEP_SECONDS": "4", "KOLORS_API_LEASE_SECONDS": "2.5", "KOLORS_API_HEARTBEAT_SECONDS": "0.25"}
    fleet.worker(slow, engine="slow")
    fleet.worker(slow, engine="slow")
    fleet.wait_workers(2)
    r = httpx.post(a.url + "/v2/kolors", headers=a.headers(), json={"prompt": "slow but alive", **SMALL})
    request_id = r.json()["request_id"]
    assert wait_all(a, a.key, [request_id], timeout=120)[request_id]["status"] == "COMPLETED"
    metrics = httpx.get(a.url + "/metrics").text
    assert "kolors_reclaims_total 0.0" in metrics


def test_a_poison_job_ends_failed_after_three_deliveries_in_the_dead_letters(fleet: Fleet,
                                                                           rdb: redis.Redis) -> None:
    a = fleet.api()
    poison = {"KOLORS_API_LEASE_SECONDS": "1"}
    r = httpx.post(a.url + "/v2/kolors", headers=a.headers(), json={"prompt": "poison pill", **SMALL})
    request_id = r.json()["request_id"]
    # one worker: its engine process dies on each delivery and the worker starts it again
    worker = fleet.worker(poison, engine="kill_on_claim")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        body = status(a, a.key, request_id)
        if body["status"] == "FAILED":
            break
        assert worker.poll() is None, fleet.logs()
        time.sleep(0.2)
    assert body == {"request_id": request_id, "status": "FAILED", "error": "worker lost 3 times"}
    log = (fleet.root / "worker0" / "worker.log").read_text()
    kills = re.findall(r"engine process 0 \(auto, pid \d+\) exited: killed by SIGKILL", log)
    assert len(kills) == 3, log
    dead = rdb.xrange(DEAD)
    assert [entry[1][b"job"].decode() for entry in dead] == [request_id]
    assert "kolors_dead_letters_total 1.0" in httpx.get(a.url + "/metrics").text


def test_a_sync_request_on_replica_a_is_served_by_replica_b_while_it_runs(fleet: Fleet) -> None:
    a, b = fleet.api(), fleet.api()
    fleet.worker(engine="slow")
    fleet.wait_workers(1)
    answer: dict[str, httpx.Response] = {}

    def sync_call() -> None:
        answer["r"] = httpx.post(a.url + "/v1/kolors", headers=a.headers(), timeout=120,
                                 json={"prompt": "across replicas", "seed": 5, **{**SMALL, "steps": 6}})

    thread = threading.Thread(target=sync_call)
    thread.start()
    seen: set[str] = set()
    request_id = None
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        history = httpx.get(b.url + "/v1/requests", headers=b.headers()).json()["data"]
        if history:
            request_id = history[0]["request_id"]
            seen.add(str(status(b, b.key, request_id)["status"]))
        time.sleep(0.05)
    thread.join()
    assert answer["r"].status_code == 200 and answer["r"].headers["x-request-id"] == request_id
    assert "PROCESSING" in seen
    result = httpx.get(f"{b.url}/v2/requests/{request_id}", headers=b.headers()).json()
    assert httpx.get(result["output"][0]).content == answer["r"].content


def test_sigterm_drains_the_job_in_hand_and_leaves_the_queue_alone(fleet: Fleet, rdb: redis.Redis) -> None:
    a = fleet.api()
    worker = fleet.worker(engine="slow")
    fleet.wait_workers(1)
    ids = [httpx.post(a.url + "/v2/kolors", headers=a.headers(),
                      json={"prompt": f"drain {i}", **{**SMALL, "steps": 4}}).json()["request_id"] for i in range(3)]
    pid, in_hand = processing_pid(rdb, {worker.pid})
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert in_hand == ids[0]
    assert status(a, a.key, ids[0])["status"] == "COMPLETED"
    assert [status(a, a.key, i)["status"] for i in ids[1:]] == ["QUEUED", "QUEUED"]
    assert httpx.get(a.url + "/readyz").status_code == 503  # no worker left


def test_the_queue_cap_answers_503_with_retry_after_and_charges_nothing(fleet: Fleet) -> None:
    a = fleet.api({"KOLORS_API_QUEUE_CAP": "3"})
    key_id, key = create_key(a, credits=10)
    codes = [httpx.post(a.url + "/v2/kolors", headers={"x-api-key": key},
                        json={"prompt": f"capped {i}", **SMALL}).status_code for i in range(3)]
    full = httpx.post(a.url + "/v2/kolors", headers={"x-api-key": key}, json={"prompt": "one too many", **SMALL})
    assert codes == [200, 200, 200]
    assert full.status_code == 503 and full.json()["error"] == "queue is full (3 jobs waiting)"
    assert int(full.headers["retry-after"]) >= 1
    account = httpx.get(a.url + "/v1/account", headers={"x-api-key": key}).json()
    assert account["credits"] == pytest.approx(10 - 3 * 0.02) and account["usage"]["requests"] == 3
    assert "kolors_queue_depth 3.0" in httpx.get(a.url + "/metrics").text


def test_a_worker_with_metrics_port_serves_its_job_durations(fleet: Fleet) -> None:
    a = fleet.api()
    port = free_port()
    fleet.worker(extra=("--metrics-port", str(port)))
    fleet.wait_workers(1)
    r = httpx.post(a.url + "/v2/kolors", headers=a.headers(), json={"prompt": "measured", **SMALL})
    request_id = r.json()["request_id"]
    assert wait_all(a, a.key, [request_id], timeout=120)[request_id]["status"] == "COMPLETED"
    wanted = 'kolors_job_duration_seconds_count{outcome="COMPLETED"} 1.0'
    deadline = time.monotonic() + 30  # recorded just after the job is stored
    while wanted not in (text := httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text):
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


def test_a_killed_workers_job_is_queued_again_on_every_replica_once_its_lease_runs_out(fleet: Fleet) -> None:
    a, b = fleet.api(), fleet.api()
    victim = fleet.worker({"KOLORS_TEST_STEP_SECONDS": "0.3"}, engine="slow")
    fleet.wait_workers(1)
    _, key = create_key(a)
    ids = [httpx.post(a.url + "/v2/kolors", headers={"x-api-key": key}, timeout=30,
                      json={"prompt": f"lost {i}", **SMALL, "steps": 50}).json()["request_id"] for i in range(2)]
    deadline = time.monotonic() + 120
    while (body := status(b, key, ids[0])).get("progress", {}).get("step", 0) < 2:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert "attempt" not in body and body["progress"]["phase"] == "denoising"  # type: ignore[index]
    victim.kill()
    victim.wait(timeout=30)
    # no other worker claims it: once the lease (3 s) runs out, every replica says QUEUED, retried
    deadline = time.monotonic() + 60
    while status(a, key, ids[0])["status"] != "QUEUED":
        assert time.monotonic() < deadline, status(a, key, ids[0])
        time.sleep(0.1)
    for api in (a, b):
        assert status(api, key, ids[0]) == {"request_id": ids[0], "status": "QUEUED", "queue_position": 0,
                                            "attempt": 2}
        assert status(api, key, ids[1]) == {"request_id": ids[1], "status": "QUEUED", "queue_position": 1}
    # a worker that comes takes it first, as its second delivery, and finishes both
    fleet.worker()
    done = wait_all(b, key, ids)
    assert {body["status"] for body in done.values()} == {"COMPLETED"}
