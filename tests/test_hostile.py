"""What an adversarial probe broke (issue 28), in process: the real app on a real SQLite store.

Hostile values for key names and webhook URLs, the access log's redaction of signatures, and
look-alike spellings of blocked prompt terms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from kolors_api.api.app import RedactSignatures
from kolors_api.jobs import JobState, JobStore, NewJob, make_key_record, new_key, revoke
from kolors_api.jobs.sqlite import SQLiteStore
from kolors_api.worker.safety import DEFAULT_BLOCKED_TERMS, PromptScreen
from tests.conftest import ADMIN_KEY
from tests.receiver import Receiver
from tests.test_fair import params
from tests.test_store import BACKENDS, drop, open_store
from tests.test_webhooks import SMALL, H, app_client, attempts


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path) as c:
        yield c


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """The store suite's backends, each in turn."""
    s = await open_store(request, tmp_path)
    yield s
    await drop(s)


# -- 10. key names take no control or format characters
@pytest.mark.parametrize(("name", "code"), [("a\nb", "U+000A"), ("a\rb", "U+000D"), ("evil\u202eexe.txt", "U+202E"),
                                            ("nul\x00", "U+0000"), ("zero\u200bwidth", "U+200B")])
def test_key_names_with_control_or_format_characters_are_refused_naming_name(client: TestClient, name: str,
                                                                            code: str) -> None:
    r = client.post("/v1/admin/keys", json={"name": name}, headers=H)
    assert r.status_code == 400 and r.json()["error"].startswith("name: must not contain control or format "
                                                                 f"characters, got {code}"), r.text
    made = client.post("/v1/admin/keys", json={"name": "ok"}, headers=H).json()
    r = client.patch(f"/v1/admin/keys/{made['id']}", json={"name": name}, headers=H)
    assert r.status_code == 400 and r.json()["error"].startswith("name: "), r.text
    names = {k["name"] for k in client.get("/v1/admin/keys", headers=H).json()["data"]}
    assert name not in names and "ok" in names


def test_key_names_in_any_script_are_still_taken(client: TestClient) -> None:
    for name in ("Zoë's team", "研发部", "ci-bot 2", "équipe 🦊"):
        r = client.post("/v1/admin/keys", json={"name": name}, headers=H)
        assert r.status_code == 201 and r.json()["name"] == name, r.text


# -- 5, 6. a webhook URL the IDNA codec refuses is a 400; no error echoes more than 100 characters of it
@pytest.mark.parametrize("url", ["http://" + "b" * 64 + "/", "http://a..b/", "http://\u00ad/",
                                 "http://" + "é" * 70 + "/"])
def test_a_host_name_the_idna_codec_refuses_is_a_400_naming_webhook(client: TestClient, url: str) -> None:
    r = client.post("/v2/kolors", json={**SMALL, "webhook": url}, headers=H)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("webhook: ") and "is not a valid host name" in r.json()["error"], r.text


@pytest.mark.parametrize("url", ["http://" + "a" * 490 + "/", "http://" + "a" * 60 + "." + "b" * 430 + ":8080/x",
                                 "gopher" + "x" * 490 + "://h/", "http://10.0.0.1/" + "x" * 490])
def test_webhook_errors_quote_at_most_100_characters_of_the_value(client: TestClient, url: str) -> None:
    r = client.post("/v2/kolors", json={**SMALL, "webhook": url}, headers=H)
    assert r.status_code == 400 and r.json()["error"].startswith("webhook: "), r.text
    error = r.json()["error"]
    assert len(error) <= 180 and not any(url[i:i + 101] in error for i in range(len(url) - 100)), error


# -- 7. the access log holds no working signature, whatever the spelling of its name
SECRET = "8d28d931" * 8


@pytest.mark.parametrize("query", [f"exp=1900000000&SIG={SECRET}", f"exp=1900000000;sig={SECRET}",
                                   f"exp=1900000000&%2573ig={SECRET}", f"exp=1900000000&sig[]={SECRET}",
                                   f"exp=1900000000&sig%00={SECRET}", f"exp=1900000000&+sig={SECRET}",
                                   f"exp=1900000000&sig={SECRET}", f"exp=1900000000&s={SECRET[:40]}"])
def test_the_access_log_line_of_an_output_route_carries_no_signature_in_any_spelling(query: str) -> None:
    path = f"/v2/requests/abc/outputs/0.webp?{query}"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", path, "1.1", 401), None)
    RedactSignatures().filter(record)
    line = record.getMessage()
    assert SECRET[:40] not in line and "/v2/requests/abc/outputs/0.webp?exp=1900000000 " in line, line


def test_the_access_log_keeps_other_routes_queries_but_drops_signature_like_values() -> None:
    for path, logged in ((f"/v1/requests?limit=5&cursor=abc&x={SECRET}", "/v1/requests?limit=5&cursor=abc"),
                         ("/v1/requests?limit=5", "/v1/requests?limit=5")):
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5", "GET", path, "1.1", 200), None)
        RedactSignatures().filter(record)
        assert f"GET {logged} HTTP" in record.getMessage()


# -- 9. look-alikes of a blocked term are caught; innocent words still pass
@pytest.mark.parametrize("prompt", ["a l\u043eli in a park",  # Cyrillic о
                                    "lo\u0301li",  # a combining acute accent
                                    "\u0440edo bear",  # Cyrillic р
                                    "l0li", "Ｌ\u043eＬＩ", "l\u03bfl\u0456"])
def test_look_alike_spellings_of_a_blocked_term_are_blocked(prompt: str) -> None:
    assert PromptScreen(DEFAULT_BLOCKED_TERMS).check(prompt) is not None, prompt


@pytest.mark.parametrize("prompt", ["a pedometer on a desk", "a classic lollipop", "naïve café in Paris",
                                    "Москва ночью", "Αθήνα at dawn", "10 red balloons", "ロボットの絵", "一只狐狸"])
def test_innocent_words_in_any_script_still_pass_the_blocklist(prompt: str) -> None:
    assert PromptScreen(DEFAULT_BLOCKED_TERMS).check(prompt) is None, prompt


# -- 1. one key's deliveries never take every slot of a runner (both backends)
async def test_webhook_claims_are_bounded_per_key(store: JobStore) -> None:
    for d in range(25):  # one key's hanging destinations, each with a backlog
        for i in range(3):
            await store.submit(NewJob(model="kolors", params=params(d * 3 + i), key_id="hostile",
                                      webhook=f"http://hang{d}.example/hook", webhook_events=("start",)))
    mine = await store.submit(NewJob(model="kolors", params=params(99), key_id="other",
                                     webhook="http://ok.example/hook", webhook_events=("start",)))
    for _ in range(76):
        assert await store.claim("w1", 30, 0.1) is not None  # each claim puts a "start" delivery in the outbox
    got = await store.claim_webhooks(30, 64, per_destination=4, per_key=16, busy_keys={"hostile": 2})
    assert Counter(d.key_id for d in got) == {"hostile": 14, "other": 1}
    assert [d.job_id for d in got if d.key_id == "other"] == [mine.id]
    assert await store.claim_webhooks(30, 64, per_destination=4, per_key=16, busy_keys={"hostile": 16}) == []
    rest = await store.claim_webhooks(30, 100, per_destination=4)  # no key bound: the others come
    assert len(rest) == 75 - 14 and {d.key_id for d in rest} == {"hostile"}


def cancelled_with_webhook(client: TestClient, key: str, url: str) -> str:
    """A queued job (no worker here) with a webhook for "failed", cancelled: a delivery at once."""
    h = {"x-api-key": key}
    r = client.post("/v2/kolors", json={**SMALL, "webhook": url, "webhook_events_filter": ["failed"]}, headers=h)
    assert r.status_code == 200, r.text
    request_id = str(r.json()["request_id"])
    assert client.post(f"/v2/requests/{request_id}/cancel", headers=h).status_code == 200
    return request_id


def wait_until(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert what()


def test_one_keys_hanging_receivers_leave_another_keys_webhook_on_time(tmp_path: Path) -> None:
    """25 destinations of one key accept and never answer, 8 deliveries each; another key's webhook
    to a healthy receiver is delivered on its first attempt within 1 s."""
    dead = [Receiver(statuses=[0]) for _ in range(25)]
    healthy = Receiver()
    try:
        with app_client(tmp_path, shutdown_grace_seconds=0.5) as client:
            hostile = client.post("/v1/admin/keys", json={"name": "hostile"}, headers=H).json()["key"]
            other = client.post("/v1/admin/keys", json={"name": "other"}, headers=H).json()["key"]
            for i in range(200):
                cancelled_with_webhook(client, hostile, dead[i % 25].url)
            wait_until(lambda: sum(r.hanging for r in dead) >= 16)
            time.sleep(0.5)  # the runner takes what it will take of the hostile key's backlog
            sent = time.time()
            request_id = cancelled_with_webhook(client, other, healthy.url)
            (post,) = healthy.wait_for(1, timeout=30)
            assert post.at - sent < 1.0, f"delivered {post.at - sent:.2f}s after the cancel"
            log = client.get(f"/v2/requests/{request_id}/webhooks", headers={"x-api-key": other}).json()["data"]
            assert [(a["attempt"], a["status"]) for a in log] == [(1, 200)]
            assert sum(r.hanging for r in dead) <= 16  # the hostile key holds at most its share
    finally:
        for r in [*dead, healthy]:
            r.close()


def test_the_per_destination_bound_counts_the_address_whatever_the_spelling(tmp_path: Path) -> None:
    """Five spellings of one receiver's address and port: at most 4 tries hang on it at once."""
    dead = Receiver(statuses=[0])
    port = dead.url.rsplit(":", 1)[1].split("/")[0]
    spellings = [f"http://127.0.0.1:{port}/hook", f"http://127.0.0.1:0{port}/hook", f"http://2130706433:{port}/hook",
                 f"http://0x7f000001:{port}/hook", f"http://0177.0.0.1:{port}/hook"]
    try:
        with app_client(tmp_path, shutdown_grace_seconds=0.5) as client:
            for i in range(20):
                cancelled_with_webhook(client, ADMIN_KEY, spellings[i % 5])
            wait_until(lambda: dead.hanging >= 4)
            time.sleep(1.0)  # long enough for more tries to pile on, were they let through
            assert dead.most_hanging == 4, dead.most_hanging
    finally:
        dead.close()


# -- 4. a disabled or deleted key's work neither runs nor goes out
@pytest.mark.parametrize("how", ["disable", "delete"])
async def test_revoking_a_key_cancels_and_refunds_its_queued_and_running_jobs(store: JobStore, how: str) -> None:
    key = make_key_record("tenant", new_key(), credits=10)
    await store.add_key(key)
    other = make_key_record("other", new_key(), credits=10)
    await store.add_key(other)
    running = await store.submit(NewJob(model="kolors", params=params(1), key_id=key.id, cost=1.0))
    queued = [await store.submit(NewJob(model="kolors", params=params(2 + i), key_id=key.id, cost=1.0))
              for i in range(3)]
    assert (await store.get_key(key.id)).credits == 10 - 4  # reserved
    lease = await store.claim("w1", 30, 0.1)
    assert lease is not None and lease.job.id == running.id
    theirs = await store.submit(NewJob(model="kolors", params=params(9), key_id=other.id, cost=1.0))
    if how == "disable":
        assert await revoke.disable_key(store, key.id) is not None
    else:
        assert await revoke.delete_key(store, key.id)
    for job in queued:
        got = await store.get(job.id)
        assert got is not None and got.state is JobState.FAILED and got.error == "cancelled"
    got = await store.get(running.id)
    assert got is not None and got.cancel_requested  # stopped at its next step, then refunded
    assert (await store.get(theirs.id)).state is JobState.QUEUED
    if how == "disable":
        assert (await store.get_key(key.id)).credits == 10 - 1  # the running one
        assert not await revoke.key_is_live(store, key.id)
    else:
        assert await store.get_key(key.id) is None and not await revoke.key_is_live(store, key.id)
    assert await revoke.key_is_live(store, other.id)
    next_lease = await store.claim("w1", 30, 0.1)
    assert next_lease is not None and next_lease.job.id == theirs.id  # the revoked key's backlog is gone


def test_no_webhook_or_signed_output_goes_out_for_a_disabled_key(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        with app_client(tmp_path) as client:
            made = client.post("/v1/admin/keys", json={"name": "tenant", "credits": 10}, headers=H).json()
            user = {"x-api-key": made["key"]}
            hook = {"webhook": receiver.url, "webhook_events_filter": ["completed", "failed"]}
            first = client.post("/v2/kolors", json={**SMALL, **hook}, headers=user).json()["request_id"]
            second = client.post("/v2/kolors", json={**SMALL, **hook}, headers=user).json()["request_id"]

            async def claim() -> Any:
                store = SQLiteStore(tmp_path / "kolors-api.sqlite3")
                lease = await store.claim("stand-in", 30, 10)
                await store.close()
                return lease
            lease = asyncio.run(claim())
            assert lease.job.id == first
            r = client.patch(f"/v1/admin/keys/{made['id']}", json={"enabled": False}, headers=H)
            assert r.status_code == 200 and r.json()["enabled"] is False
            assert client.get(f"/v2/requests/{second}/status", headers=H).json()["error"] == "cancelled"

            async def finish() -> None:  # a worker that finishes before it sees the cancel
                store = SQLiteStore(tmp_path / "kolors-api.sqlite3")
                assert await store.complete(lease, [b"\x89PNG-not-really"], "png", [7], {"inference_time": 0.1})
                await store.close()
            asyncio.run(finish())
            wait_until(lambda: len(attempts(client, first)) >= 1 and len(attempts(client, second)) >= 1)
            for rid in (first, second):
                assert [(a["status"], a["error"]) for a in attempts(client, rid)] == [
                    (None, "not sent: the request's API key is disabled or deleted")]
            assert receiver.posts == []
            svc = client.app.state.service  # type: ignore[attr-defined]
            path = f"/v2/requests/{first}/outputs/0.png"
            r = client.get(f"{path}?{svc.signer.query(path, time.time() + 600)}")
            assert r.status_code == 403 and "disabled or deleted" in r.json()["error"], r.text
    finally:
        receiver.close()
