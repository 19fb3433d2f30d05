"""Embedded durability: a kill -9 loses no accepted job; results expire after the retention period."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, start_server
from tests.pixel_engines import ENGINE_ENV

SLOW = {"prompt": "slow", "steps": 50, "width": 1024, "height": 1024}
#: The torch-free engine, 0.1 s a step: SLOW takes 5 s, and a process is up in about a second.
PIXELS: dict[str, Any] = {"env": {**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": "0.1"},
                          "extra": ["--engine", "tests.pixel_engines:slow"]}
SMALL = {"prompt": "small", "steps": 2, "width": 512, "height": 512}


def poll(server: LiveServer, request_id: str, until: set[str], timeout: float = 180) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers=server.headers(), timeout=10)
        body = r.json()
        if body.get("status") in until:
            return body  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached {until}")


def test_kill_9_with_a_job_running_and_one_queued_then_restart_completes_both(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server("tiny", data, **PIXELS)
    try:
        running = httpx.post(server.url + "/v2/kolors", json=SLOW, headers=server.headers()).json()["request_id"]
        queued = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=server.headers()).json()["request_id"]
        poll(server, running, {"PROCESSING"})
        status = httpx.get(f"{server.url}/v2/requests/{queued}/status", headers=server.headers()).json()
        assert status == {"request_id": queued, "status": "QUEUED", "queue_position": 0}
        server.kill(9)
        port = int(server.url.rsplit(":", 1)[1])
        server = start_server("tiny", data, port=port, log_name="server2.log", **PIXELS)
        for request_id in (running, queued):
            assert poll(server, request_id, {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
            result = httpx.get(f"{server.url}/v2/requests/{request_id}", headers=server.headers()).json()
            assert len(result["output"]) == 1
            assert httpx.get(result["output"][0]).status_code == 200
        history = httpx.get(server.url + "/v1/requests", headers=server.headers()).json()["data"]
        assert sorted(h["request_id"] for h in history) == sorted([running, queued])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def short_retention(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server("tiny", tmp_path_factory.mktemp("retention"), extra=["--engine", "tests.pixel_engines:pixels"],
                       env={**ENGINE_ENV, "KOLORS_API_RETENTION_SECONDS": "3"})
    yield srv  # type: ignore[misc]
    srv.stop()


def test_a_result_is_served_before_expiry_and_404_after(short_retention: LiveServer) -> None:
    server = short_retention
    r = httpx.post(server.url + "/v1/kolors", json=SMALL, headers={**server.headers(), "accept": "application/json"},
                   timeout=60)
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    result = httpx.get(f"{server.url}/v2/requests/{request_id}", headers=server.headers())
    assert result.status_code == 200
    url = result.json()["output"][0]
    assert httpx.get(url).status_code == 200
    time.sleep(3.5)
    assert httpx.get(f"{server.url}/v2/requests/{request_id}", headers=server.headers()).status_code == 404
    assert httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers=server.headers()).status_code == 404
    assert httpx.get(url).status_code == 404


def test_a_tampered_or_missing_signature_needs_the_owners_key(short_retention: LiveServer) -> None:
    server = short_retention
    r = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=server.headers())
    request_id = r.json()["request_id"]
    poll(server, request_id, {"COMPLETED"})
    url = httpx.get(f"{server.url}/v2/requests/{request_id}", headers=server.headers()).json()["output"][0]
    assert httpx.get(url).status_code == 200
    tampered = httpx.get(url.replace("sig=", "sig=0"))
    assert tampered.status_code == 401
    assert tampered.json()["error"].startswith("invalid output URL signature: use the URL from the result")
    bare = url.split("?")[0]
    unsigned = httpx.get(bare)
    assert unsigned.status_code == 401 and unsigned.json()["error"].startswith("unsigned output URL: ")
    assert httpx.get(bare, headers=server.headers()).status_code == 200


def test_a_sync_request_past_the_deadline_is_504_with_its_request_id(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "d", env={**PIXELS["env"], "KOLORS_API_SYNC_TIMEOUT_SECONDS": "0.5"},
                          extra=PIXELS["extra"])
    try:
        r = httpx.post(server.url + "/v1/kolors", json=SLOW, headers=server.headers(), timeout=60)
        assert r.status_code == 504
        body = r.json()
        assert body["request_id"] and "did not finish" in body["error"]
        assert r.headers["X-Request-Id"] == body["request_id"]  # every answer about an accepted job names it
        assert poll(server, body["request_id"], {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
    finally:
        server.stop()
