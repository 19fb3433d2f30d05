"""Credits: reserved atomically at submit (no overdraft under a race), refunded on FAILED, priced by size.

The servers run without a worker (`--no-worker`): accepted jobs stay QUEUED and nothing burns CPU.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer, flushed_redis, redis_db_url, start_server

SEED = {"prompt": "a fox", "steps": 25, "width": 1024, "height": 1024}  # costs exactly 1.0
REDIS_DB_URL = redis_db_url(11)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("credits"), extra=["--no-worker"], ready=False)
    yield server
    server.stop()


def account(srv: LiveServer, key: str) -> dict[str, Any]:
    r = httpx.get(srv.url + "/v1/account", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def submit_many(urls: list[str], key: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    """`count` v2 submits at once, spread round-robin over the servers in `urls`."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers={"x-api-key": key}) as client:
        return list(await asyncio.gather(*(client.post(f"{urls[i % len(urls)]}/v2/kolors", json=body)
                                           for i in range(count))))


def assert_race_outcome(responses: list[httpx.Response], servers: list[LiveServer], key: dict[str, Any]) -> None:
    counts = Counter(r.status_code for r in responses)
    assert counts == {200: 5, 406: 45}, counts
    for r in responses:
        if r.status_code == 406:
            assert r.json() == {"error": "insufficient credits: need 1, have 0"}
    accepted = {r.json()["request_id"] for r in responses if r.status_code == 200}
    for srv in servers:  # every replica sees the same balance and ledger
        acct = account(srv, key["key"])
        assert acct["credits"] == 0
        # queued, not run: reserved, not spent
        assert acct["usage"] == {"credits_spent": 0, "credits_reserved": 5, "requests": 5, "running": 5}
        history = httpx.get(srv.url + "/v1/requests", headers={"x-api-key": key["key"]}).json()["data"]
        assert {row["request_id"] for row in history} == accepted
        assert sum(row["cost"] for row in history) == 5


async def test_fifty_concurrent_submits_on_five_credits_accept_exactly_five(srv: LiveServer) -> None:
    key = srv.create_key(credits=5)
    responses = await submit_many([srv.url], key["key"], SEED, 50)
    assert_race_outcome(responses, [srv], key)


def submits_answered(srv: LiveServer) -> Counter[int]:
    """The v2 submits this server process answered, by HTTP status (from its Prometheus counter)."""
    text = httpx.get(srv.url + "/metrics").text
    answered: Counter[int] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "kolors_http_requests_total" and labels["method"] == "POST"
                    and labels["route"] == "/v2/{model}"):
                answered[int(labels["status"])] += int(sample.value)
    return answered


@pytest.fixture
def redis_db() -> Iterator[Any]:
    yield from flushed_redis(REDIS_DB_URL)


async def test_the_race_holds_across_two_api_processes_on_redis(redis_db: Any, tmp_path: Path) -> None:
    servers = [start_server("tiny", tmp_path / f"api{i}", extra=["--store", REDIS_DB_URL, "--no-worker"],
                            ready=False) for i in range(2)]
    try:
        key = servers[0].create_key(credits=5)
        responses = await submit_many([s.url for s in servers], key["key"], SEED, 50)
        assert_race_outcome(responses, servers, key)
        # What each replica itself answered (its own /metrics): both took part in the race, and
        # between them they accepted exactly five, whichever replica each winner reached.
        answered = [submits_answered(s) for s in servers]
        assert all(a[200] + a[406] > 0 for a in answered), answered
        assert sum(answered, Counter()) == {200: 5, 406: 45}, answered
    finally:
        for s in servers:
            s.stop()


def test_a_cancelled_queued_job_is_refunded(srv: LiveServer) -> None:
    key = srv.create_key(credits=3)
    h = {"x-api-key": key["key"]}
    job = httpx.post(srv.url + "/v2/kolors", json=SEED, headers=h).json()
    assert account(srv, key["key"])["credits"] == 2

    r = httpx.post(f"{srv.url}/v2/requests/{job['request_id']}/cancel", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "FAILED" and r.json()["error"] == "cancelled"

    acct = account(srv, key["key"])
    assert acct["credits"] == 3, "a FAILED job leaves the balance where it was"
    assert acct["usage"] == {"credits_spent": 0, "credits_reserved": 0, "requests": 1, "running": 0}
    status = httpx.get(f"{srv.url}/v2/requests/{job['request_id']}/status", headers=h)
    assert status.status_code == 422 and status.json()["error"] == "cancelled"
    # Cancelling again changes nothing: refunded once.
    httpx.post(f"{srv.url}/v2/requests/{job['request_id']}/cancel", headers=h)
    assert account(srv, key["key"])["credits"] == 3


# (number_of_images, steps, width, height) → credits: n × steps/25 × w·h/1024²
SHAPES = [
    ((1, 25, 1024, 1024), 1),
    ((2, 50, 1024, 1024), 4),
    ((1, 25, 512, 512), 0.25),
    ((1, 10, 768, 1024), 0.3),
    ((3, 5, 2048, 512), 0.6),
    ((10, 50, 2048, 2048), 80),
]


@pytest.mark.parametrize(("shape", "cost"), SHAPES)
def test_price_is_images_times_steps_times_area(srv: LiveServer, shape: tuple[int, int, int, int],
                                                 cost: float) -> None:
    n, steps, width, height = shape
    body = {"prompt": "a fox", "number_of_images": n, "steps": steps, "width": width, "height": height}
    broke = srv.create_key(credits=0)
    r = httpx.post(srv.url + "/v2/kolors", json=body, headers={"x-api-key": broke["key"]})
    assert r.status_code == 406
    assert r.json() == {"error": f"insufficient credits: need {cost:g}, have 0"}

    rich = srv.create_key(credits=100)
    r = httpx.post(srv.url + "/v2/kolors", json=body, headers={"x-api-key": rich["key"]})
    assert r.status_code == 200, r.text
    assert account(srv, rich["key"])["credits"] == pytest.approx(100 - cost)


def test_a_refused_submit_takes_nothing(srv: LiveServer) -> None:
    key = srv.create_key(credits=0.5)
    h = {"x-api-key": key["key"]}
    assert httpx.post(srv.url + "/v2/kolors", json=SEED, headers=h).status_code == 406
    assert httpx.post(srv.url + "/v2/kolors", json={**SEED, "steps": 0}, headers=h).status_code == 400
    acct = account(srv, key["key"])
    assert acct["credits"] == 0.5
    assert acct["usage"] == {"credits_spent": 0, "credits_reserved": 0, "requests": 0, "running": 0}
    assert httpx.get(srv.url + "/v1/requests", headers=h).json()["data"] == []
    # A top-up makes the same request go through.
    httpx.patch(f"{srv.url}/v1/admin/keys/{key['id']}", json={"add_credits": 0.5}, headers=srv.headers())
    assert httpx.post(srv.url + "/v2/kolors", json=SEED, headers=h).status_code == 200
    assert account(srv, key["key"])["credits"] == 0


# -- add_credits racing submits: the bound is checked in the store's own transaction / script
TENTH = {"prompt": "a fox", "steps": 10, "width": 512, "height": 512}  # costs exactly 0.1
ROUNDS = 8


async def race_round(url: str, admin: str, key: dict[str, Any], at: int) -> tuple[int, int]:
    """PATCH add_credits -1.0 sent as the `at`-th of six 0.1 submits, all at once:
    (PATCH status, submits accepted)."""
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        patch = client.patch(f"{url}/v1/admin/keys/{key['id']}", json={"add_credits": -1.0},
                             headers={"x-api-key": admin})
        submits = [client.post(f"{url}/v2/kolors", json=TENTH, headers={"x-api-key": key["key"]})
                   for _ in range(6)]
        answers = await asyncio.gather(*submits[:at], patch, *submits[at:])
    patched = answers.pop(at)
    for r in answers:
        assert r.status_code in (200, 406), r.text
    if patched.status_code == 400:
        assert patched.json()["error"].startswith("add_credits: would make the balance -"), patched.text
    return patched.status_code, sum(r.status_code == 200 for r in answers)


async def assert_balance_never_negative(srv: LiveServer) -> Counter[tuple[int, int]]:
    outcomes: Counter[tuple[int, int]] = Counter()
    for i in range(ROUNDS):
        key = srv.create_key(credits=1.0)
        status, accepted = await race_round(srv.url, srv.key, key, at=i % 7)
        outcomes[(status, accepted)] += 1
        acct = account(srv, key["key"])
        taken = 1.0 if status == 200 else 0.0
        assert acct["credits"] >= 0, acct
        # exact, not approximately: the stores count integer micro-credits
        assert acct["credits"] == round(1.0 - taken - 0.1 * accepted, 6), (status, accepted, acct)
        assert status == 400 or accepted == 0, "the PATCH took the whole balance: no submit could fit"
        assert acct["usage"]["credits_reserved"] == round(0.1 * accepted, 6)
    return outcomes


async def test_add_credits_racing_submits_never_leaves_a_negative_balance(srv: LiveServer) -> None:
    outcomes = await assert_balance_never_negative(srv)
    assert sum(outcomes.values()) == ROUNDS, outcomes
    print("race outcomes (PATCH status, submits accepted): rounds", dict(outcomes))


async def test_add_credits_racing_submits_never_leaves_a_negative_balance_on_redis(redis_db: Any,
                                                                                   tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "api", extra=["--store", REDIS_DB_URL, "--no-worker"], ready=False)
    try:
        outcomes = await assert_balance_never_negative(server)
        assert sum(outcomes.values()) == ROUNDS, outcomes
        print("race outcomes (PATCH status, submits accepted): rounds", dict(outcomes))
    finally:
        server.stop()


def test_balances_are_exact_and_shown_rounded(srv: LiveServer) -> None:
    key = srv.create_key(credits=1.0)
    h = {"x-api-key": key["key"]}
    for _ in range(3):
        assert httpx.post(srv.url + "/v2/kolors", json=TENTH, headers=h).status_code == 200
    acct = account(srv, key["key"])
    assert acct["credits"] == 0.7, "1.0 - 3 × 0.1 in floats is 0.7000000000000001"
    assert acct["usage"] == {"credits_spent": 0, "credits_reserved": 0.3, "requests": 3, "running": 3}
    for delta in (57.98, 0.01, -0.29):
        r = httpx.patch(f"{srv.url}/v1/admin/keys/{key['id']}", json={"add_credits": delta}, headers=srv.headers())
        assert r.status_code == 200, r.text
    assert account(srv, key["key"])["credits"] == 58.4
    for _ in range(7):
        httpx.post(srv.url + "/v2/kolors", json=TENTH, headers=h)
    drained = srv.create_key(credits=0.3)
    for _ in range(3):
        assert httpx.post(srv.url + "/v2/kolors", json=TENTH, headers={"x-api-key": drained["key"]}).status_code == 200
    r = httpx.post(srv.url + "/v2/kolors", json=TENTH, headers={"x-api-key": drained["key"]})
    assert r.json() == {"error": "insufficient credits: need 0.1, have 0"}, "not `have 1.38778e-16`"


@pytest.mark.parametrize("delta", [-1.000001, -2, 1e9])
def test_add_credits_out_of_bounds_is_400_and_changes_nothing(srv: LiveServer, delta: float) -> None:
    key = srv.create_key(credits=1.0)
    r = httpx.patch(f"{srv.url}/v1/admin/keys/{key['id']}", json={"add_credits": delta, "name": "renamed"},
                    headers=srv.headers())
    assert r.status_code == 400 and r.json()["error"].startswith("add_credits: would make the balance "), r.text
    listed = {k["id"]: k for k in httpx.get(srv.url + "/v1/admin/keys", headers=srv.headers()).json()["data"]}
    assert listed[key["id"]]["credits"] == 1.0 and listed[key["id"]]["name"] == "user"
