"""A store that cannot be reached or cannot write: 503 with Retry-After on every route, one log line
per outage (not per request), no traceback, and the API and its worker go on by themselves after.

Redis: the test starts a private `redis-server` on a free port (never the machine's own Redis),
stops it under a running `serve` with a worker, and starts it again. It keeps an append-only file
in the test's directory, so the restarted server holds the same keys and jobs. SQLite: another
connection holds the write lock ("database is locked"), in process, with a short busy timeout.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.testclient import TestClient

from kolors_api.api.app import create_app
from kolors_api.jobs.outage import is_outage
from kolors_api.jobs.sqlite import SQLiteStore
from kolors_api.settings import Settings
from tests.conftest import ADMIN_KEY, LiveServer, free_port, skip_or_fail, start_server, wait_up
from tests.engines import ENGINE_ENV

#: The torch-free engine: the outage is the point, not the pixels.
PIXELS = "tests.pixel_engines:pixels"

SMALL = {"prompt": "a fox", "steps": 2, "width": 512, "height": 512}
UNAVAILABLE = {"error": "store unavailable: try again shortly"}


def is_unavailable(r: httpx.Response) -> bool:
    """The outage answer: Segmind's flat shape, or OpenAI's error object on the OpenAI route."""
    body = r.json()
    if r.request.url.path == "/v1/images/generations":
        error = body.get("error")
        return isinstance(error, dict) and error.get("message") == UNAVAILABLE["error"] \
            and error.get("code") == "service_unavailable"
    return bool(body == UNAVAILABLE)


@pytest.mark.parametrize(("exc", "outage"), [
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.OperationalError("disk I/O error"), True),
    (sqlite3.OperationalError("database or disk is full"), True),
    (sqlite3.OperationalError("attempt to write a readonly database"), True),
    (sqlite3.DatabaseError("database disk image is malformed"), True),
    (RedisConnectionError("Error 111 connecting to 127.0.0.1:6391. Connection refused."), True),
    (RedisTimeoutError("Timeout reading from socket"), True),
    (BusyLoadingError("Redis is loading the dataset in memory"), True),
    (ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
    (ResponseError("READONLY You can't write against a read only replica."), True),
    (ConnectionRefusedError(111, "Connection refused"), True),
    (sqlite3.IntegrityError("UNIQUE constraint failed"), False),
    (sqlite3.ProgrammingError("Cannot operate on a closed database."), False),
    (ResponseError("ERR wrong number of arguments for 'hset' command"), False),
    (ValueError("bug"), False),
    (KeyError("bug"), False),
])
def test_outages_are_told_from_bugs(exc: Exception, outage: bool) -> None:
    assert is_outage(exc) is outage


# -- Redis: a private server, stopped and started again under a live fleet server
class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("redis-server is not installed")
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        import redis

        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def outage_lines(server: LiveServer, logger: str) -> list[str]:
    return [line for line in server.log().splitlines() if f" {logger} job store unavailable: " in line]


def every_route(server: LiveServer, job: str, key: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """One request of each route that touches the store: (method, path, JSON body or None)."""
    return [
        ("POST", "/v2/kolors", SMALL), ("POST", "/v1/kolors", SMALL),
        ("POST", "/v1/images/generations", {"prompt": "a fox", "size": "512x512", "steps": 2}),
        ("GET", f"/v2/requests/{job}/status", None), ("GET", f"/v2/requests/{job}", None),
        ("GET", f"/v2/requests/{job}/outputs/0.webp?exp=1&sig=x", None),
        ("POST", f"/v2/requests/{job}/cancel", None), ("GET", "/v1/account", None),
        ("GET", "/v1/requests", None), ("GET", "/v1/admin/keys", None), ("POST", "/v1/admin/keys", {"name": "n"}),
        ("PATCH", f"/v1/admin/keys/{key['id']}", {"add_credits": 1}), ("DELETE", f"/v1/admin/keys/{key['id']}", None),
        ("GET", "/metrics", None),
    ]


def completed(r: httpx.Response) -> bool:
    """A status answer says COMPLETED; a 503 while the store comes back (Redis still loading its
    file, a pooled connection that died with the old server) is an answer to retry, not a failure."""
    if r.status_code == 503 and is_unavailable(r):
        return False
    assert r.status_code == 200, r.text
    return bool(r.json()["status"] == "COMPLETED")


def wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_redis_down_is_503_everywhere_logged_once_and_the_fleet_goes_on_after(
        private_redis: PrivateRedis, tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "api", extra=["--store", private_redis.url, "--engine", PIXELS],
                          env={**ENGINE_ENV, "KOLORS_API_HEARTBEAT_SECONDS": "1"})
    try:
        key = server.create_key(credits=10)
        h = server.headers()
        job = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=h).json()["request_id"]

        private_redis.stop()
        with httpx.Client(base_url=server.url, headers=h, timeout=60) as client:
            for _ in range(3):
                for method, path, body in every_route(server, job, key):
                    r = client.request(method, path, json=body)
                    assert r.status_code == 503, (method, path, r.status_code, r.text)
                    assert is_unavailable(r) and int(r.headers["Retry-After"]) > 0, (method, path)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "Retry-After" in ready.headers
            assert client.get("/healthz").status_code == 200
        time.sleep(2)  # the worker's claim loop meets the outage too
        assert len(outage_lines(server, "kolors_api.api")) == 1, server.log()[-3000:]
        assert len(outage_lines(server, "kolors_api.worker")) == 1, server.log()[-3000:]
        assert "Traceback" not in server.log()

        private_redis.start()  # the same port, the same append-only file
        wait_up(server, timeout=60)
        after = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=h)
        assert after.status_code == 200, after.text
        for request_id in (job, after.json()["request_id"]):
            wait_for(lambda rid=request_id: completed(httpx.get(f"{server.url}/v2/requests/{rid}/status", headers=h)))
        assert httpx.get(server.url + "/v1/account", headers={"x-api-key": key["key"]}).status_code == 200
        wait_for(lambda: "job store available again" in server.log(), timeout=30)
        assert "Traceback" not in server.log()
    finally:
        server.stop()


# -- SQLite: "database is locked" while another process holds the write lock
def test_a_locked_sqlite_database_is_503_logged_once_then_writes_go_on(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "db.sqlite3"
    settings = Settings(worker=False, data_dir=tmp_path, bootstrap_key=ADMIN_KEY, allowed_hosts="testserver")
    app = create_app(settings, store=SQLiteStore(path, busy_timeout=0.2))
    h = {"x-api-key": ADMIN_KEY}
    caplog.set_level(logging.WARNING, logger="kolors_api.api")
    with TestClient(app, raise_server_exceptions=False) as client:
        key = client.post("/v1/admin/keys", json={"name": "user", "credits": 5}, headers=h).json()
        job = client.post("/v2/kolors", json=SMALL, headers=h).json()["request_id"]
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            writes = [("POST", "/v2/kolors", SMALL), ("POST", "/v1/images/generations", {"prompt": "a fox"}),
                      ("POST", f"/v2/requests/{job}/cancel", None), ("POST", "/v1/admin/keys", {"name": "n"}),
                      ("PATCH", f"/v1/admin/keys/{key['id']}", {"add_credits": 1}),
                      ("DELETE", f"/v1/admin/keys/{key['id']}", None)]
            for _ in range(2):
                for method, path_, body in writes:
                    r = client.request(method, path_, json=body, headers=h)
                    if path_ == "/v1/images/generations" and r.status_code == 503 and not is_unavailable(r):
                        continue  # no worker: refused before it writes
                    assert r.status_code == 503 and is_unavailable(r), (method, path_, r.text)
                    assert r.headers["Retry-After"] == "5"
            # reads go on (WAL): the job is still there, queued
            assert client.get(f"/v2/requests/{job}/status", headers=h).json()["status"] == "QUEUED"
        finally:
            other.execute("ROLLBACK")
            other.close()
        warnings = [rec for rec in caplog.records if "unavailable" in rec.getMessage()]
        assert len(warnings) == 1 and "database is locked" in warnings[0].getMessage()
        assert not any(rec.exc_info for rec in caplog.records), "no traceback for an outage"
        assert client.post("/v2/kolors", json=SMALL, headers=h).status_code == 200
        assert client.get("/v1/account", headers={"x-api-key": key["key"]}).json()["credits"] == 5


# -- a sync request that is waiting when the store goes away: its job was accepted and goes on
def test_a_sync_request_waiting_when_redis_goes_away_names_its_accepted_job(
        private_redis: PrivateRedis, tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "api",
                          extra=["--store", private_redis.url, "--engine", "tests.pixel_engines:slow"],
                          env={**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": "1", "KOLORS_API_HEARTBEAT_SECONDS": "1"})
    try:
        key = server.create_key(credits=10)
        h = {"x-api-key": key["key"]}
        answers: list[httpx.Response] = []
        sync = threading.Thread(target=lambda: answers.append(
            httpx.post(server.url + "/v1/kolors", json={**SMALL, "steps": 4}, headers=h, timeout=120)))
        sync.start()
        history: list[Any] = []

        def running() -> bool:
            history[:] = httpx.get(server.url + "/v1/requests", headers=h).json()["data"]
            return any(j["status"] == "PROCESSING" for j in history)

        wait_for(running)  # the sync request is waiting for its job
        private_redis.stop()
        sync.join(60)
        (r,) = answers
        assert r.status_code == 503, r.text
        body = r.json()
        request_id = body["request_id"]
        assert request_id == history[0]["request_id"] and r.headers["X-Request-Id"] == request_id
        assert body["error"] == (f"store unreachable while waiting; request {request_id} was accepted and goes on: "
                                 f"fetch it with GET /v2/requests/{request_id}")
        assert body["response_url"] == f"{server.url}/v2/requests/{request_id}"
        assert int(r.headers["Retry-After"]) > 0

        private_redis.start()
        wait_up(server, timeout=60)
        wait_for(lambda: completed(httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers=h)))
        result = httpx.get(f"{server.url}/v2/requests/{request_id}", headers=h)
        assert result.status_code == 200 and result.headers["X-Request-Id"] == request_id
        assert httpx.get(result.json()["output"][0]).status_code == 200
        # fetched, not paid twice: one request in the history, charged once
        account = httpx.get(server.url + "/v1/account", headers=h).json()
        assert account["usage"]["requests"] == 1 and account["credits"] == pytest.approx(10 - 4 / 25 / 4)
        assert "Traceback" not in server.log()
    finally:
        server.stop()
