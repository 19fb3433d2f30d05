"""Webhooks and Idempotency-Key, in process: the real app on a real SQLite store, real HTTP receivers on
loopback, the real `standardwebhooks` verifier. A job is run by a stand-in worker: a second store on
the same file (another process would do the same), claiming and completing through the store.

The SSRF battery never sends a packet beyond loopback, even if the guard had a bug: the refused
targets are loopback-range addresses that are not allow-listed, or names a stub resolver maps to them,
each watched by a listening socket that must see no connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpcore
import pytest
from standardwebhooks import Webhook
from starlette.testclient import TestClient

from kolors_api.api.app import create_app
from kolors_api.api.ssrf import IP, Blocked, GuardedBackend, Policy, check_webhook_url, why_blocked
from kolors_api.jobs.sqlite import SQLiteStore
from kolors_api.settings import Settings
from tests.conftest import ADMIN_KEY
from tests.receiver import Receiver, Tripwire

SMALL = {"prompt": "a fox", "steps": 2, "width": 512, "height": 512, "seed": 7}
H = {"x-api-key": ADMIN_KEY}


def app_client(tmp_path: Path, resolve: Any = None, **settings: Any) -> TestClient:
    fields: dict[str, Any] = {"worker": False, "data_dir": tmp_path, "bootstrap_key": ADMIN_KEY,
                              "allowed_hosts": "testserver", "webhook_allow_hosts": "127.0.0.1",
                              "webhook_retry_delays": "0.2,0.2,0.2,0.2,0.2", **settings}
    app = create_app(Settings(**fields))
    if resolve is not None:
        app.state.service.resolve = resolve
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def run_next_job(tmp_path: Path, *, fail: str | None = None) -> str:
    """Claim the next job as a worker would (another store on the file) and complete or fail it."""
    async def go() -> str:
        store = SQLiteStore(tmp_path / "kolors-api.sqlite3")
        try:
            lease = await store.claim("stand-in", 30, 10)
            assert lease is not None
            await store.progress(lease, 1, 2)
            if fail:
                assert await store.fail(lease, fail)
            else:
                assert await store.complete(lease, [b"\x89PNG-not-really"], "png", [7], {"inference_time": 0.1})
            return lease.job.id
        finally:
            await store.close()
    return asyncio.run(go())


def verified(client: TestClient, receiver: Receiver, n: int) -> list[dict[str, Any]]:
    """The first `n` deliveries, each verified with the key's secret by the standardwebhooks package."""
    secret = client.get("/v1/account", headers=H).json()["webhook_secret"]
    hook = Webhook(secret)
    return [hook.verify(p.body, p.headers) for p in receiver.wait_for(n)[:n]]


def attempts(client: TestClient, request_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v2/requests/{request_id}/webhooks", headers=H)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


# -- delivery
def test_a_receiver_that_fails_twice_gets_one_accepted_delivery_after_three_logged_attempts(
        tmp_path: Path, client: TestClient, receiver: Receiver) -> None:
    receiver.statuses = [500, 503, 200]
    r = client.post("/v2/kolors", json={**SMALL, "webhook": receiver.url}, headers=H)
    assert r.status_code == 200, r.text
    job_id = run_next_job(tmp_path)
    bodies = verified(client, receiver, 3)
    time.sleep(1.0)  # the schedule's next try would have come by now
    assert [p.status for p in receiver.posts] == [500, 503, 200]
    assert len({p.headers["webhook-id"] for p in receiver.posts}) == 1  # one delivery, three tries
    assert bodies[-1]["request_id"] == job_id and bodies[-1]["status"] == "COMPLETED"
    assert bodies[-1]["seeds"] == [7] and bodies[-1]["output"][0].startswith("http://127.0.0.1:8000/v2/requests/")
    assert receiver.posts[0].headers["x-kolors-event"] == "completed"
    log = attempts(client, job_id)
    assert [(a["attempt"], a["status"], a["event"]) for a in log] == [(1, 500, "completed"), (2, 503, "completed"),
                                                                       (3, 200, "completed")]
    assert log[0]["error"] == "HTTP 500" and log[2]["error"] is None and all(a["latency"] >= 0 for a in log)


def test_a_410_is_tried_once_and_stops_the_jobs_deliveries(tmp_path: Path, client: TestClient,
                                                          receiver: Receiver) -> None:
    receiver.statuses = [410]  # (that later events of the job are not delivered either: tests/test_store.py)
    r = client.post("/v2/kolors", json={**SMALL, "webhook": receiver.url}, headers=H)
    assert r.status_code == 200, r.text
    job_id = run_next_job(tmp_path)
    receiver.wait_for(1)
    time.sleep(1.5)
    assert len(receiver.posts) == 1
    assert [a["status"] for a in attempts(client, job_id)] == [410]


def test_the_events_filter_picks_the_deliveries(tmp_path: Path, client: TestClient, receiver: Receiver) -> None:
    body = {**SMALL, "webhook": receiver.url, "webhook_events_filter": ["start", "failed"]}
    job_id = client.post("/v2/kolors", json=body, headers=H).json()["request_id"]
    run_next_job(tmp_path, fail="engine error: boom")
    delivered = verified(client, receiver, 2)
    time.sleep(0.8)
    assert sorted(p.headers["x-kolors-event"] for p in receiver.posts) == ["failed", "start"]
    failed = next(b for b, p in zip(delivered, receiver.posts, strict=True) if p.headers["x-kolors-event"] == "failed")
    assert failed == {"request_id": job_id, "status": "FAILED", "error": "engine error: boom"}


def test_a_rotated_secret_signs_from_then_on_and_only_admins_rotate(tmp_path: Path, client: TestClient,
                                                                    receiver: Receiver) -> None:
    user = client.post("/v1/admin/keys", json={"name": "u"}, headers=H).json()
    uh = {"x-api-key": user["key"]}
    old = client.get("/v1/account", headers=uh).json()["webhook_secret"]
    assert old.startswith("whsec_") and old != client.get("/v1/account", headers=H).json()["webhook_secret"]
    assert client.post(f"/v1/admin/keys/{user['id']}/webhook-secret", headers=uh).status_code == 403
    assert client.post("/v1/admin/keys/nope/webhook-secret", headers=H).status_code == 404
    new = client.post(f"/v1/admin/keys/{user['id']}/webhook-secret", headers=H).json()["webhook_secret"]
    assert new != old and client.get("/v1/account", headers=uh).json()["webhook_secret"] == new
    job_id = client.post("/v2/kolors", json={**SMALL, "webhook": receiver.url}, headers=uh).json()["request_id"]
    run_next_job(tmp_path)
    post = receiver.wait_for(1)[0]
    assert Webhook(new).verify(post.body, post.headers)["request_id"] == job_id
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(old).verify(post.body, post.headers)
    # the attempts are the owner's: another key sees a 404
    assert client.get(f"/v2/requests/{job_id}/webhooks", headers=uh).status_code == 200
    other = client.post("/v1/admin/keys", json={"name": "o"}, headers=H).json()["key"]
    assert client.get(f"/v2/requests/{job_id}/webhooks", headers={"x-api-key": other}).status_code == 404


@pytest.mark.parametrize(("field", "value", "says"), [
    ("webhook", 5, "webhook: must be an http or https URL, got integer"),
    ("webhook", "ftp://127.0.0.1/x", "webhook: must be an http or https URL, got scheme 'ftp'"),
    ("webhook", "file:///etc/passwd", "webhook: must be an http or https URL, got scheme 'file'"),
    ("webhook", "javascript:alert(1)", "webhook: must be an http or https URL, got scheme 'javascript'"),
    ("webhook", "http://user:pw@127.0.0.1/", "webhook: must not carry credentials"),
    ("webhook", "http:///nohost", "webhook: must name a host"),
    ("webhook", "http://127.0.0.1:99999/", "webhook: not a valid URL"),
    ("webhook", "http://h/" + "a" * 2048, "webhook: must be at most 2048 characters"),
    ("webhook_events_filter", [], "webhook_events_filter: must be a non-empty list"),
    ("webhook_events_filter", ["done"], "webhook_events_filter: 'done' is not an event"),
    ("webhook_events_filter", "completed", "webhook_events_filter: must be a non-empty list"),
])
def test_malformed_webhook_fields_are_refused_naming_the_field(client: TestClient, field: str, value: Any,
                                                               says: str) -> None:
    body = {**SMALL, "webhook": "http://127.0.0.1:9/hook", field: value}
    r = client.post("/v2/kolors", json=body, headers=H)
    assert r.status_code == 400 and r.json()["error"].startswith(says), r.text
    assert client.get("/v1/requests", headers=H).json()["data"] == []  # nothing was queued


def test_the_models_schema_names_the_webhook_fields(client: TestClient) -> None:
    props = client.get("/v1/models", headers=H).json()["data"][0]["parameters"]["properties"]
    assert props["webhook"]["type"] == "string"
    assert props["webhook_events_filter"]["items"]["enum"] == ["start", "progress", "completed", "failed"]


# -- the SSRF battery
@pytest.mark.parametrize(("address", "kind"), [
    ("10.1.2.3", "a private address"), ("172.16.0.1", "a private address"), ("192.168.1.1", "a private address"),
    ("127.0.0.2", "a loopback address"), ("0.0.0.0", "an unspecified address"),  # noqa: S104
    ("169.254.169.254", "a cloud metadata address"), ("169.254.1.1", "a link-local address"),
    ("100.64.0.1", "a carrier-grade NAT address"), ("224.0.0.1", "a multicast address"),
    ("240.0.0.1", "a reserved address"), ("::1", "a loopback address"), ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"), ("fc00::1", "a private address"),
    ("fd00:ec2::254", "a cloud metadata address"), ("ff02::1", "a multicast address"),
    ("::ffff:127.0.0.2", "an IPv4-mapped IPv6 address"), ("::ffff:8.8.8.8", "an IPv4-mapped IPv6 address"),
    ("64:ff9b::a01:203", "an IPv6 address embedding a private address"),
    ("2002:a9fe:a9fe::", "an IPv6 address embedding a cloud metadata address"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_the_guard_knows_each_kind_of_address(address: str, kind: str | None) -> None:
    assert why_blocked(ipaddress.ip_address(address)) == kind  # a pure function: no packet is sent


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


REFUSED = ["http://127.0.0.2:{p}/hook", "http://0.0.0.0:{p}/hook", "http://0x7f000002:{p}/hook",
           "http://2130706434:{p}/hook", "http://127.2:{p}/hook", "http://[::ffff:127.0.0.2]:{p}/hook",
           "https://127.0.0.2:{p}/hook", "http://localhost.stub:{p}/hook"]


def stub_resolver(mapping: dict[str, list[str]]) -> Any:
    """A resolver that maps names to the given addresses (literals are themselves), counting calls."""
    calls: dict[str, int] = {}

    async def resolve(host: str, port: int) -> list[IP]:
        from kolors_api.api.ssrf import literal

        if (ip := literal(host)) is not None:
            return [ip]
        n = calls[host] = calls.get(host, 0) + 1
        answers = mapping[host]
        return [ipaddress.ip_address(answers[min(n, len(answers)) - 1])]
    return resolve


def test_refused_webhooks_are_400_at_submit_and_never_dialled(tmp_path: Path) -> None:
    trip = Tripwire("127.0.0.2")
    trip6 = Tripwire("::1", socket.AF_INET6) if _ipv6_loopback() else None
    urls = [u.format(p=trip.port) for u in REFUSED]
    if trip6 is not None:
        urls.append(f"http://[::1]:{trip6.port}/hook")
    resolve = stub_resolver({"localhost.stub": ["127.0.0.2"]})
    try:
        with app_client(tmp_path, resolve=resolve) as c:
            for url in urls:
                r = c.post("/v2/kolors", json={**SMALL, "webhook": url}, headers=H)
                assert r.status_code == 400, (url, r.text)
                assert r.json()["error"].startswith("webhook: "), r.text
            assert c.get("/v1/requests", headers=H).json()["data"] == []
            # and the connect-time guard refuses them too, when asked to dial them directly
            for url in urls:
                with pytest.raises(Blocked):
                    asyncio.run(_dial(url, resolve))
        assert not trip.connected() and (trip6 is None or not trip6.connected())
    finally:
        trip.close()
        if trip6 is not None:
            trip6.close()


async def _dial(url: str, resolve: Any, policy: Policy | None = None) -> int:
    """POST to `url` through the guarded network backend of the delivery runner."""
    async with httpcore.AsyncConnectionPool(network_backend=GuardedBackend(policy or Policy("127.0.0.1"),
                                                                           resolve)) as pool:
        r = await pool.request("POST", url, content=b"{}")
        return int(r.status)


def test_dns_rebinding_is_refused_at_connect_time(tmp_path: Path) -> None:
    """The name resolves to an allowed address at submit and to a refused one when the delivery
    dials: the guard checks the address it dials, so nothing connects."""
    trip = Tripwire("127.0.0.2")
    resolve = stub_resolver({"rebind.stub": ["127.0.0.1", "127.0.0.2"]})
    try:
        with app_client(tmp_path, resolve=resolve) as c:
            r = c.post("/v2/kolors", json={**SMALL, "webhook": f"http://rebind.stub:{trip.port}/hook"}, headers=H)
            assert r.status_code == 200, r.text
            job_id = run_next_job(tmp_path)
            deadline = time.monotonic() + 30
            while not (log := attempts(c, job_id)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(log) == 1 and log[0]["status"] is None
            assert log[0]["error"] == ("refused by the SSRF guard: rebind.stub resolves to 127.0.0.2, "
                                       "a loopback address")
            time.sleep(0.8)
            assert len(attempts(c, job_id)) == 1  # not tried again
        assert not trip.connected()
    finally:
        trip.close()


def test_a_loopback_webhook_is_refused_naming_the_setting_that_allows_it(tmp_path: Path) -> None:
    with app_client(tmp_path, webhook_allow_hosts="") as c:
        r = c.post("/v2/kolors", json={**SMALL, "webhook": "http://127.0.0.1:9000/hook"}, headers=H)
    assert (r.status_code, r.json()) == (400, {"error": (
        "webhook: 127.0.0.1 is a loopback address; the server allows such hosts when they are listed in "
        "KOLORS_API_WEBHOOK_ALLOW_HOSTS (e.g. KOLORS_API_WEBHOOK_ALLOW_HOSTS=127.0.0.1)")})


async def test_an_allow_listed_name_is_reached() -> None:
    receiver = Receiver()
    try:
        resolve = stub_resolver({"hooks.internal": ["127.0.0.1"]})
        url = receiver.url.replace("127.0.0.1", "hooks.internal")
        await check_webhook_url(url, Policy("hooks.internal"), resolve)
        with pytest.raises(Blocked, match="hooks.internal resolves to 127.0.0.1, a loopback address"):
            await check_webhook_url(url, Policy(""), resolve)
        assert await _dial(url, resolve, Policy("hooks.internal")) == 200
    finally:
        receiver.close()


# -- Idempotency-Key
def test_a_repeated_idempotency_key_answers_the_same_and_charges_once(client: TestClient) -> None:
    user = client.post("/v1/admin/keys", json={"name": "u", "credits": 10}, headers=H).json()
    uh = {"x-api-key": user["key"], "Idempotency-Key": "order-42"}
    first = client.post("/v2/kolors", json=SMALL, headers=uh)
    again = client.post("/v2/kolors", json=SMALL, headers=uh)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    account = client.get("/v1/account", headers=uh).json()
    assert account["credits"] == 9.98 and account["usage"]["requests"] == 1  # 512², 2 steps: 0.02, once
    other = client.post("/v2/kolors", json={**SMALL, "seed": 8}, headers=uh)
    assert other.status_code == 422 and other.json()["error"].startswith("Idempotency-Key: "), other.text
    assert client.post("/v2/kolors", json=SMALL, headers={**uh, "Idempotency-Key": "k" * 256}).status_code == 400
    assert client.post("/v2/kolors", json=SMALL, headers={**uh, "Idempotency-Key": "k" * 255}).status_code == 200
    # a repeat is no new request: a key whose rate limit is spent still gets its answer again
    limited = client.post("/v1/admin/keys", json={"name": "l", "rate_limit": "1/min"}, headers=H).json()
    lh = {"x-api-key": limited["key"], "Idempotency-Key": "once"}
    answers = [client.post("/v2/kolors", json=SMALL, headers=lh) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200] and answers[2].json() == answers[0].json()
    assert client.post("/v2/kolors", json=SMALL, headers={**lh, "Idempotency-Key": "twice"}).status_code == 429
    # another API key may use the same Idempotency-Key for its own request
    mine = client.post("/v2/kolors", json=SMALL, headers={**H, "Idempotency-Key": "order-42"})
    assert mine.status_code == 200 and mine.json()["request_id"] != first.json()["request_id"]

