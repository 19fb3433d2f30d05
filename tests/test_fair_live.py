"""Fair share with real processes, on both stores (embedded SQLite; API and worker on Redis): a key's
backlog does not hold another key's job, and a receiver that never answers does not hold another
key's webhook. (The store-level rules are in test_fair.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import LiveServer, start_server, wait_for_status
from tests.pixel_engines import ENGINE_ENV
from tests.receiver import Receiver
from tests.test_fleet import SMALL, Fleet, fleet, rdb  # noqa: F401 - the fleet fixtures

HOOKS = {"KOLORS_API_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "KOLORS_API_WEBHOOK_RETRY_DELAYS": "0.5,0.5,0.5"}
#: The torch-free engine, 50 ms a step: a backlog of 200 jobs lasts about 20 s, far longer than the
#: test takes to submit them, so a lone job that waited its turn behind them would show.
ENGINE = {**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": "0.05"}


@pytest.fixture
def step_seconds() -> str:
    """The engine's time a step (a test that needs none parametrizes it to "0")."""
    return ENGINE["KOLORS_TEST_STEP_SECONDS"]


@pytest.fixture(params=["sqlite", "redis"])
def api(request: pytest.FixtureRequest, tmp_path: Path, step_seconds: str) -> Iterator[LiveServer]:
    """A server with one worker: embedded (SQLite, in-process worker) or a fleet (Redis)."""
    engine = {**ENGINE, "KOLORS_TEST_STEP_SECONDS": step_seconds}
    if request.param == "sqlite":
        srv = start_server("tiny", tmp_path, env={**HOOKS, **engine}, extra=["--engine", "tests.pixel_engines:slow"])
        yield srv
        srv.stop()
    else:
        group: Fleet = request.getfixturevalue("fleet")
        srv = group.api(HOOKS)
        group.worker(engine, engine="slow")
        group.wait_workers(1)
        yield srv


def submit(api: LiveServer, key: str, prompt: str, **extra: object) -> str:
    r = httpx.post(api.url + "/v2/kolors", json={"prompt": prompt, **SMALL, **extra}, headers={"x-api-key": key},
                   timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def started(api: LiveServer, key: str) -> dict[str, float | None]:
    """started_at of each of the key's requests (its whole history)."""
    out: dict[str, float | None] = {}
    cursor = None
    while True:
        page = httpx.get(api.url + "/v1/requests", params={"limit": 100, **({"cursor": cursor} if cursor else {})},
                         headers={"x-api-key": key}).json()
        out.update({row["request_id"]: row["started_at"] for row in page["data"]})
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_a_lone_keys_job_is_not_held_behind_another_keys_backlog(api: LiveServer) -> None:
    flood, lone = api.create_key(name="flood"), api.create_key(name="lone")
    for i in range(200):
        submit(api, flood["key"], f"flood {i}")
    mine = submit(api, lone["key"], "alone")
    status = httpx.get(f"{api.url}/v2/requests/{mine}/status", headers={"x-api-key": lone["key"]}).json()
    assert status["status"] != "QUEUED" or status["queue_position"] == 0, status
    wait_for_status(api, lone["key"], mine, lambda s: s["status"] == "COMPLETED", timeout=120)
    (row,) = httpx.get(api.url + "/v1/requests", headers={"x-api-key": lone["key"]}).json()["data"]
    submitted, at = row["created_at"], row["started_at"]
    between = [t for t in started(api, flood["key"]).values() if t is not None and submitted < t < at]
    # it ran in the next engine call (one of at most 8 images on CPU, which it may share with the
    # flood's jobs of its shape), not after the flood's 200
    assert len(between) < 8, len(between)


# the jobs' time is not the point here, their webhooks' are: 160 jobs with no time a step
@pytest.mark.parametrize("step_seconds", ["0"], ids=["no-step-time"])
def test_a_receiver_that_never_answers_does_not_hold_another_keys_webhook(api: LiveServer) -> None:
    dead, live = Receiver(statuses=[0]), Receiver(statuses=[200])
    try:
        a, b = api.create_key(name="dead-hooks"), api.create_key(name="live-hooks")
        a_jobs = [submit(api, a["key"], f"a {i}", webhook=dead.url) for i in range(160)]
        wait_for_status(api, a["key"], a_jobs[-1], lambda s: s["status"] == "COMPLETED", timeout=300)
        dead.wait_for(4, timeout=60)  # its deliveries hang now, and more than a hundred are due behind them
        mine = submit(api, b["key"], "b", webhook=live.url)
        wait_for_status(api, b["key"], mine, lambda s: s["status"] == "COMPLETED", timeout=120)
        (post,) = live.wait_for(1, timeout=30)
        body = Webhook(str(httpx.get(api.url + "/v1/account", headers={"x-api-key": b["key"]}).json()[
            "webhook_secret"])).verify(post.body, post.headers)
        assert body["request_id"] == mine and body["status"] == "COMPLETED"
        history = httpx.get(api.url + "/v1/requests", headers={"x-api-key": b["key"]}).json()["data"]
        finished = next(row["finished_at"] for row in history if row["request_id"] == mine)
        assert post.at - finished < 5, post.at - finished
        # the dead receiver held about the per-destination bound (4) at once, not a whole round (16 before):
        # each slot's next try may open before the receiver notices that the one it gave up on closed
        assert 1 <= dead.most_hanging <= 2 * 4, dead.most_hanging
        metrics = httpx.get(api.url + "/metrics").text
        assert 'kolors_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics, json.dumps(metrics[-500:])
    finally:
        dead.close()
        live.close()
