"""Event streams beyond one process: a fleet on real Redis (two API replicas and a worker), keep-alive
comments of an idle stream, and a store outage under a stream. The last two run the app in this
process (uvicorn on loopback in a thread) so that the keep-alive interval can be shortened."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from kolors_api.api import events
from kolors_api.api.app import create_app
from kolors_api.settings import Settings
from tests.conftest import ADMIN_KEY, LiveServer, flushed_redis, free_port, redis_db_url, start_process, start_server
from tests.engines import ENGINE_ENV
from tests.test_events import REVOCATIONS, Frame, check_a_revoked_keys_stream_ends, result, steps, watch
from tests.test_outage import PrivateRedis

#: A db of its own (the env names another where several checkouts share one Redis).
DB_URL = os.environ.get("KOLORS_API_TEST_EVENTS_REDIS", redis_db_url(14))
JOB = {"prompt": "a harbour at night", "width": 512, "height": 512}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[LiveServer]]:
    """Two API replicas (no worker) and one worker with 0.1 s steps, on a flushed Redis db."""
    for _ in flushed_redis(DB_URL):
        apis = [start_server("tiny", tmp_path / f"api{n}", ready=False, extra=["--store", DB_URL, "--no-worker"])
                for n in range(2)]
        worker, _ = start_process(["worker", "--store", DB_URL, "--model", "tiny", "--data-dir",
                                   str(tmp_path / "worker"), "--engine", "tests.pixel_engines:slow"],
                                  tmp_path / "worker",
                                  {**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": "0.1",
                                   "KOLORS_TEST_FIRST_STEP_SECONDS": "1"}, "worker.log")
        try:
            deadline = time.monotonic() + 120
            while "kolors_workers_alive 1.0" not in httpx.get(apis[0].url + "/metrics").text:
                log = tmp_path / "worker" / "worker.log"
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield apis
        finally:
            worker.kill()
            worker.wait()
            for api in apis:
                api.stop()


def test_watchers_on_any_replica_follow_a_job_of_the_worker_and_resume_on_another(fleet: list[LiveServer]) -> None:
    a, b = fleet
    r = httpx.post(f"{a.url}/v2/kolors", json={**JOB, "steps": 20}, headers=a.headers(), timeout=30)
    rid = r.json()["request_id"]
    whole: list[Frame] = []
    follower = threading.Thread(target=lambda: whole.extend(watch(b, rid)))
    follower.start()
    # another watcher on replica A with previews, who hangs up at step 5 and comes back on replica B
    before = watch(a, rid, previews=True, until=lambda f: f.event == "progress" and f.data["step"] >= 5)
    time.sleep(0.3)
    after = watch(b, rid, previews=True, last_id=before[-1].id)
    follower.join(timeout=120)

    assert steps(whole) == list(range(1, 21))  # every step, through Redis pub/sub
    assert after[-1].event == whole[-1].event == "completed"
    assert after[-1].id == whole[-1].id  # the same event has the same id on every replica
    assert steps(after)[0] > before[-1].data["step"] and steps(after)[-1] == 20
    assert any("preview" in f.data for f in before + after)
    on_a, on_b = result(a, rid), after[-1].data
    assert on_b["seeds"] == on_a["seeds"] and on_b["metrics"] == on_a["metrics"]
    assert [httpx.URL(u).path for u in on_b["output"]] == [httpx.URL(u).path for u in on_a["output"]]


@pytest.mark.parametrize("how", REVOCATIONS)
def test_a_key_revoked_on_one_replica_loses_its_streams_on_the_other(fleet: list[LiveServer], how: str) -> None:
    a, b = fleet
    check_a_revoked_keys_stream_ends(b, a, how)


class InProcess:
    """The app served by uvicorn on loopback from a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers={"x-api-key": ADMIN_KEY, **kw.pop("headers", {})}, timeout=30,
                         **kw)


def submit(srv: InProcess) -> str:
    r = httpx.post(srv.url + "/v2/kolors", json={**JOB, "steps": 2}, headers={"x-api-key": ADMIN_KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def test_an_idle_stream_gets_keep_alive_comments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "KEEPALIVE_SECONDS", 0.2)
    settings = Settings(worker=False, data_dir=tmp_path, bootstrap_key=ADMIN_KEY)
    with InProcess(settings) as srv:
        rid = submit(srv)  # no worker: it stays queued
        seen = ""
        with httpx.stream("GET", f"{srv.url}/v2/requests/{rid}/events", headers={"x-api-key": ADMIN_KEY},
                          timeout=30) as r:
            for chunk in r.iter_text():
                seen += chunk
                if seen.count(": keep-alive\n\n") >= 2:
                    break
    first, _, rest = seen.partition("\n\n")
    assert first.splitlines()[1:] == ["event: queued", f'data: {{"request_id":"{rid}","status":"QUEUED",'
                                                      '"queue_position":0}']
    assert rest.startswith(": keep-alive\n\n")


def test_a_store_outage_ends_the_stream_and_a_new_one_is_503(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "redis")
    redis_server.start()
    try:
        settings = Settings(worker=False, data_dir=tmp_path, bootstrap_key=ADMIN_KEY, store=redis_server.url)
        with InProcess(settings) as srv:
            rid = submit(srv)
            seen: list[str] = []
            with httpx.stream("GET", f"{srv.url}/v2/requests/{rid}/events", headers={"x-api-key": ADMIN_KEY},
                              timeout=30) as r:
                for chunk in r.iter_text():
                    seen.append(chunk)
                    if len(seen) == 1:
                        redis_server.stop()  # the queued job's position is re-read within a second
            assert "event: queued" in seen[0] and "".join(seen[1:]).strip("\n") in ("", ": keep-alive")
            r = srv.get(f"/v2/requests/{rid}/events")
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert set(r.json()) == {"error"}
    finally:
        redis_server.stop()


def test_watchers_that_hang_up_on_a_job_that_never_moves_leave_nothing_behind(tmp_path: Path) -> None:
    settings = Settings(worker=False, data_dir=tmp_path, bootstrap_key=ADMIN_KEY)
    with InProcess(settings) as srv:
        rid = submit(srv)  # no worker: nothing will ever wake its watchers
        svc = srv.server.config.app.state.service
        for _ in range(5):
            with httpx.stream("GET", f"{srv.url}/v2/requests/{rid}/events", headers={"x-api-key": ADMIN_KEY},
                              timeout=30) as r:
                assert "event: queued" in next(r.iter_text())
        deadline = time.monotonic() + 10
        while (svc.metrics.event_streams._value.get() or rid in svc.store._waiters) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.metrics.event_streams._value.get() == 0
        assert rid not in svc.store._waiters  # no task left waiting on the job
