"""Webhooks and Idempotency-Key with real processes: API replicas and workers on a real Redis, an
embedded server killed and restarted, the real segmind and openai SDKs, receivers on loopback."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import openai
from segmind import SegmindClient
from standardwebhooks import Webhook

from tests.conftest import ADMIN_KEY, LiveServer, start_server, wait_for_status
from tests.pixel_engines import serving
from tests.receiver import Receiver
from tests.test_fleet import SMALL, Fleet, fleet, rdb  # noqa: F401 - the fleet fixtures

HOOKS = {"KOLORS_API_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "KOLORS_API_WEBHOOK_RETRY_DELAYS": "0.5,0.5,0.5,0.5,0.5"}


def secret_of(api: LiveServer, key: str) -> str:
    return str(httpx.get(api.url + "/v1/account", headers={"x-api-key": key}).json()["webhook_secret"])


def attempts(api: LiveServer, key: str, request_id: str) -> list[dict[str, object]]:
    r = httpx.get(f"{api.url}/v2/requests/{request_id}/webhooks", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def test_twenty_concurrent_submits_with_one_key_on_two_api_replicas_make_one_job_and_one_charge(
        fleet: Fleet) -> None:  # noqa: F811
    env = {"KOLORS_API_PUBLIC_URL": "http://api.example"}  # one fleet behind one name: the same links
    a, b = fleet.api(env), fleet.api(env)
    made = a.create_key(name="idem", credits=10)
    headers = {"x-api-key": made["key"], "Idempotency-Key": "checkout-7f3a"}
    body = {"prompt": "a fox", **SMALL, "seed": 3}

    def submit(i: int) -> tuple[int, dict[str, object]]:
        r = httpx.post(f"{(a, b)[i % 2].url}/v2/kolors", json=body, headers=headers, timeout=30)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    assert {code for code, _ in answers} == {200}
    assert all(answer == answers[0][1] for _, answer in answers), answers  # 20 identical answers
    history = httpx.get(b.url + "/v1/requests", headers=headers).json()["data"]
    assert [h["request_id"] for h in history] == [answers[0][1]["request_id"]]  # one job
    account = httpx.get(a.url + "/v1/account", headers=headers).json()
    assert account["usage"]["requests"] == 1 and account["credits"] == 10 - 0.02  # one charge


def test_a_worker_killed_after_completing_a_job_still_gets_its_webhook_delivered(fleet: Fleet) -> None:  # noqa: F811
    receiver = Receiver(statuses=[500, 200])  # the first try fails: the second comes after the kill
    try:
        api = fleet.api(HOOKS)
        worker = fleet.worker()
        fleet.wait_workers(1)
        made = api.create_key(name="hooks", credits=10)
        sdk = SegmindClient(api_key=made["key"], base_url=api.v1, timeout=60)
        job = sdk.submit_async("kolors", prompt="a fox", webhook=receiver.url, **SMALL)
        wait_for_status(api, made["key"], job.request_id, lambda s: s["status"] == "COMPLETED")
        worker.kill()  # SIGKILL, at once: the delivery was in the store's outbox with the completion
        worker.wait()
        posts = receiver.wait_for(2)
        body = Webhook(secret_of(api, made["key"])).verify(posts[1].body, posts[1].headers)
        assert body["request_id"] == job.request_id and body["status"] == "COMPLETED"
        assert [a["status"] for a in attempts(api, made["key"], job.request_id)] == [500, 200]
    finally:
        receiver.close()


def test_a_pending_delivery_survives_the_embedded_server_being_killed(tmp_path: Path) -> None:
    """SIGKILL `serve` while a delivery waits for its retry; the restarted server delivers it."""
    receiver = Receiver(statuses=[500, 200])
    env = {**HOOKS, "KOLORS_API_WEBHOOK_RETRY_DELAYS": "4,4"}
    srv = start_server("tiny", tmp_path, **serving(env=env))
    try:
        r = httpx.post(srv.url + "/v2/kolors", json={"prompt": "a fox", **SMALL, "webhook": receiver.url},
                       headers=srv.headers())
        request_id = r.json()["request_id"]
        receiver.wait_for(1, timeout=120)
        deadline = time.monotonic() + 30
        while not attempts(srv, ADMIN_KEY, request_id) and time.monotonic() < deadline:
            time.sleep(0.02)  # the first try is recorded: the delivery waits for its retry
        srv.kill()
        assert len(receiver.posts) == 1
        srv = start_server("tiny", tmp_path, **serving(env=env))
        posts = receiver.wait_for(2)
        assert Webhook(secret_of(srv, ADMIN_KEY)).verify(posts[1].body, posts[1].headers)["request_id"] == request_id
        assert [a["status"] for a in attempts(srv, ADMIN_KEY, request_id)] == [500, 200]
    finally:
        srv.stop()
        receiver.close()


def test_idempotency_key_on_the_sync_routes_with_the_openai_sdk(tmp_path: Path) -> None:
    srv = start_server("tiny", tmp_path, **serving())
    try:
        made = srv.create_key(name="oai", credits=10)
        client = openai.OpenAI(api_key=made["key"], base_url=srv.v1, max_retries=0, timeout=120)
        kw = {"prompt": "a fox", "size": "512x512", "extra_body": {"steps": 2, "seed": 5},
              "extra_headers": {"Idempotency-Key": "oai-1"}}
        first = client.images.with_raw_response.generate(**kw)  # type: ignore[call-overload]
        again = client.images.with_raw_response.generate(**kw)  # type: ignore[call-overload]
        assert again.headers["x-request-id"] == first.headers["x-request-id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
        other = {**kw, "extra_body": {"steps": 2, "seed": 6}}
        try:
            client.images.generate(**other)  # type: ignore[call-overload]
            raise AssertionError("another body with the same key was accepted")
        except openai.UnprocessableEntityError as exc:
            assert "Idempotency-Key" in str(exc)
        # v1 sync: a repeat waits for the same job and returns its image
        h = {"x-api-key": made["key"], "Idempotency-Key": "v1-1"}
        body = {"prompt": "a fox", **SMALL, "seed": 5}
        one = httpx.post(srv.url + "/v1/kolors", json=body, headers=h, timeout=120)
        two = httpx.post(srv.url + "/v1/kolors", json=body, headers=h, timeout=120)
        assert one.status_code == two.status_code == 200
        assert two.headers["x-request-id"] == one.headers["x-request-id"] and two.content == one.content
        account = httpx.get(srv.url + "/v1/account", headers=h).json()
        assert account["usage"]["requests"] == 2 and abs(account["credits"] - (10 - 0.02 - 0.02)) < 1e-9
    finally:
        srv.stop()


def test_a_try_cut_off_by_its_api_replica_dying_is_made_again_by_another_replica(fleet: Fleet) -> None:  # noqa: F811
    receiver = Receiver(statuses=[0, 200])  # the first try gets no answer: it is in flight when A dies
    try:
        # a try's lease is three of its timeouts: 6 s here, not the default 30 s, and still far longer
        # than the moment between the try reaching the receiver and A's death
        a = fleet.api({**HOOKS, "KOLORS_API_WEBHOOK_TIMEOUT_SECONDS": "2"})
        fleet.worker()
        fleet.wait_workers(1)
        made = a.create_key(name="hooks", credits=10)
        r = httpx.post(a.url + "/v2/kolors", json={"prompt": "a fox", **SMALL, "webhook": receiver.url},
                       headers={"x-api-key": made["key"]})
        request_id = r.json()["request_id"]
        receiver.wait_for(1, timeout=120)
        a.kill()  # SIGKILL mid-try: the delivery stays claimed until its lease (6 s) runs out
        b = fleet.api(HOOKS)
        posts = receiver.wait_for(2, timeout=120)
        assert posts[1].headers["webhook-id"] == posts[0].headers["webhook-id"]  # at least once, one delivery
        body = Webhook(secret_of(b, made["key"])).verify(posts[1].body, posts[1].headers)
        assert body["request_id"] == request_id and body["status"] == "COMPLETED"
        log = attempts(b, made["key"], request_id)
        assert [(t["attempt"], t["status"]) for t in log] == [(2, 200)]  # the cut-off try was never recorded
    finally:
        receiver.close()
