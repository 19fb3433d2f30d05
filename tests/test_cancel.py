"""A cancel during the last step, end to end on both stores: the answer `cancel_requested: true`
is kept. The engine (`tests.pixel_engines:slow_finish`, torch-free) has finished every step and holds the images for
two seconds before the worker stores them; the cancel comes in that window, so the worker never
sees it between steps, and the completion itself must honour it: FAILED "cancelled", refunded, no
images. A cancel after the completion answers `cancel_requested: false` and the job stays charged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, flushed_redis, redis_db_url, start_server, wait_for_status
from tests.engines import ENGINE_ENV

SMALL = {"prompt": "a fox", "steps": 3, "width": 512, "height": 512}  # costs 0.03
REDIS_DB_URL = redis_db_url(5)


@pytest.fixture(params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    extra = ["--engine", "tests.pixel_engines:slow_finish"]
    if request.param == "redis":
        redis_db = flushed_redis(REDIS_DB_URL)
        next(redis_db)
        extra += ["--store", REDIS_DB_URL]
    srv = start_server("tiny", tmp_path, env=ENGINE_ENV, extra=extra)
    yield srv
    srv.stop()
    if request.param == "redis":
        next(redis_db, None)  # empties the db again


def last_step(body: dict[str, Any]) -> bool:
    assert body["status"] in ("QUEUED", "PROCESSING"), body
    progress = body.get("progress") or {}
    return body["status"] == "PROCESSING" and progress.get("step", 0) >= progress.get("total_steps", 99)


def account(server: LiveServer, key: str) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/v1/account", headers={"x-api-key": key}).json())


def test_a_cancel_during_the_last_step_fails_the_job_and_refunds_it(server: LiveServer) -> None:
    key = server.create_key(credits=1)["key"]
    h = {"x-api-key": key}
    for round_ in range(3):
        request_id = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=h).json()["request_id"]
        wait_for_status(server, key, request_id, last_step, timeout=120, interval=0.02)
        answer = httpx.post(f"{server.url}/v2/requests/{request_id}/cancel", headers=h).json()
        assert answer["status"] == "PROCESSING" and answer["cancel_requested"] is True, answer
        final = wait_for_status(server, key, request_id, lambda b: b["status"] in ("COMPLETED", "FAILED"),
                                timeout=120, interval=0.02)
        assert final == {"request_id": request_id, "status": "FAILED", "error": "cancelled"}, round_
        result = httpx.get(f"{server.url}/v2/requests/{request_id}", headers=h)
        assert result.status_code == 422 and result.json()["error"] == "cancelled"
        acct = account(server, key)
        assert acct["credits"] == 1 and acct["usage"]["credits_spent"] == 0, acct

    # After the completion, a cancel is too late and says so.
    request_id = httpx.post(server.url + "/v2/kolors", json=SMALL, headers=h).json()["request_id"]
    wait_for_status(server, key, request_id, lambda b: b["status"] == "COMPLETED", timeout=120,
                    interval=0.02)
    late = httpx.post(f"{server.url}/v2/requests/{request_id}/cancel", headers=h).json()
    assert late == {"request_id": request_id, "status": "COMPLETED", "cancel_requested": False}
    assert account(server, key)["credits"] == 0.97
