"""Per-key rate limits (moving window) and the concurrency cap on the generation routes.

Headers follow draft-ietf-httpapi-ratelimit-headers (Structured Fields syntax), policy "key":
`RateLimit-Policy: "key";q=10;w=60` and `RateLimit: "key";r=<left>;t=<seconds until a slot frees>`.
The servers run without a worker (`--no-worker`): accepted jobs stay QUEUED.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, flushed_redis, redis_db_url, start_server

SMALL = {"prompt": "a fox", "steps": 1, "width": 512, "height": 512}
REDIS_DB_URL = redis_db_url(12)
RATELIMIT = re.compile(r'^"key";r=(\d+);t=(\d+)$')


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("ratelimits"), extra=["--no-worker"], ready=False)
    yield server
    server.stop()


def remaining(r: httpx.Response) -> tuple[int, int]:
    match = RATELIMIT.match(r.headers["RateLimit"])
    assert match, r.headers["RateLimit"]
    return int(match[1]), int(match[2])


def test_ten_per_minute_accepts_ten_of_thirty(srv: LiveServer) -> None:
    key = srv.create_key(rate_limit="10/min", credits=100)
    with httpx.Client(base_url=srv.url, headers={"x-api-key": key["key"]}, timeout=30) as client:
        responses = [client.post("/v2/kolors", json=SMALL) for _ in range(30)]
        history = client.get("/v1/requests", params={"limit": "100"}).json()["data"]
        acct = client.get("/v1/account").json()
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 20
    for i, r in enumerate(responses[:10]):
        assert r.headers["RateLimit-Policy"] == '"key";q=10;w=60'
        left, reset = remaining(r)
        assert left == 9 - i and 0 <= reset <= 60
    for r in responses[10:]:
        assert r.json()["error"].startswith("rate limit exceeded: this key allows 10/min")
        assert r.headers["RateLimit-Policy"] == '"key";q=10;w=60'
        left, reset = remaining(r)
        retry = int(r.headers["Retry-After"])
        assert left == 0 and 1 <= retry <= 60 and reset <= retry
    # Refusals store nothing and charge nothing.
    assert len(history) == 10
    assert acct["usage"]["requests"] == 10 and acct["credits"] == pytest.approx(100 - 10 * 0.01)


def test_a_key_without_a_rate_limit_gets_no_headers(srv: LiveServer) -> None:
    key = srv.create_key()
    for _ in range(3):
        r = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers={"x-api-key": key["key"]})
        assert r.status_code == 200
        assert "RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/kolors", SMALL),
    ("/v1/images/generations", {"prompt": "a fox", "size": "512x512"}),
    ("/v2/kolors", SMALL),
])
def test_every_generation_route_shares_the_key_limit(srv: LiveServer, path: str, body: dict[str, Any]) -> None:
    key = srv.create_key(rate_limit="1/min")
    h = {"x-api-key": key["key"]}
    assert httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h).status_code == 200
    r = httpx.post(srv.url + path, json=body, headers=h)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) >= 1 and r.headers["RateLimit-Policy"] == '"key";q=1;w=60'


def test_invalid_requests_do_not_use_the_quota(srv: LiveServer) -> None:
    key = srv.create_key(rate_limit="1/min")
    h = {"x-api-key": key["key"]}
    assert httpx.post(srv.url + "/v2/kolors", json={**SMALL, "steps": 99}, headers=h).status_code == 400
    assert httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h).status_code == 200


def test_requests_refused_for_credits_do_not_use_the_quota(srv: LiveServer) -> None:
    key = srv.create_key(rate_limit="2/min", credits=0)
    h = {"x-api-key": key["key"]}
    for path, body in [("/v2/kolors", SMALL), ("/v1/kolors", SMALL),
                       ("/v1/images/generations", {"prompt": "a fox", "size": "512x512", "steps": 1})] * 2:
        r = httpx.post(srv.url + path, json=body, headers=h)
        assert r.status_code == 406 and "RateLimit" not in r.headers, (path, r.text)
    httpx.patch(f"{srv.url}/v1/admin/keys/{key['id']}", json={"add_credits": 1}, headers=srv.headers())
    answers = [httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429], "six 406s took no slot of the two"
    assert remaining(answers[0])[0] == 1


def test_a_patched_rate_limit_applies_at_once(srv: LiveServer) -> None:
    key = srv.create_key(rate_limit="1/min")
    h = {"x-api-key": key["key"]}
    assert httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h).status_code == 200
    assert httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h).status_code == 429
    httpx.patch(f"{srv.url}/v1/admin/keys/{key['id']}", json={"rate_limit": None}, headers=srv.headers())
    r = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h)
    assert r.status_code == 200 and "RateLimit" not in r.headers


def test_max_concurrency_refuses_a_second_job_while_one_is_queued(srv: LiveServer) -> None:
    key = srv.create_key(max_concurrency=1, credits=10)
    h = {"x-api-key": key["key"]}
    first = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h)
    assert first.status_code == 200
    second = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h)
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert second.json() == {"error": "too many concurrent requests: the limit of this key is 1"}
    credits = httpx.get(srv.url + "/v1/account", headers=h).json()["credits"]
    assert credits == pytest.approx(10 - 0.01), "the refused one is not charged"
    # When the first one ends (here: cancelled), the slot is free again.
    httpx.post(f"{srv.url}/v2/requests/{first.json()['request_id']}/cancel", headers=h)
    assert httpx.post(srv.url + "/v2/kolors", json=SMALL, headers=h).status_code == 200


@pytest.fixture
def redis_db() -> Iterator[Any]:
    yield from flushed_redis(REDIS_DB_URL)


async def test_the_limit_holds_across_two_api_processes_on_redis(redis_db: Any, tmp_path: Path) -> None:
    servers = [start_server("tiny", tmp_path / f"api{i}", extra=["--store", REDIS_DB_URL, "--no-worker"],
                            ready=False) for i in range(2)]
    try:
        key = servers[0].create_key(rate_limit="10/min")
        limits = httpx.Limits(max_connections=30, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers={"x-api-key": key["key"]}) as client:
            responses = await asyncio.gather(*(client.post(f"{servers[i % 2].url}/v2/kolors", json=SMALL)
                                               for i in range(30)))
        counts = Counter(r.status_code for r in responses)
        # Each replica gets 15: unshared, each would admit 10 (20 in all); shared, they admit 10 together.
        assert set(counts) == {200, 429} and 9 <= counts[200] <= 11, counts
        for r in responses:
            assert r.headers["RateLimit-Policy"] == '"key";q=10;w=60'
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
        assert [k for k in redis_db.scan_iter(match="kolors:ratelimit:*")], "the window lives in Redis"
    finally:
        for s in servers:
            s.stop()


# -- an Idempotency-Key repeated at once is the same request: never a 429 while the original stands
async def identical_bursts(urls: list[str], key: LiveServer, *, bursts: int = 6, size: int = 12) -> None:
    """`bursts` bursts of `size` identical submits (one Idempotency-Key each) on a key limited to
    1/min, sent at once over `urls` in turn: every answer is the original's, exactly one job each."""
    limits = httpx.Limits(max_connections=size * len(urls), max_keepalive_connections=0)
    for burst in range(bursts):
        user = key.create_key(rate_limit="1/min")
        h = {"x-api-key": user["key"], "idempotency-key": f"burst-{burst}"}
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=h) as client:
            responses = await asyncio.gather(*(client.post(f"{urls[i % len(urls)]}/v2/kolors", json=SMALL)
                                               for i in range(size)))
            history = (await client.get(f"{urls[0]}/v1/requests", params={"limit": "100"})).json()["data"]
        assert [r.status_code for r in responses] == [200] * size, [(r.status_code, r.text) for r in responses]
        assert len({r.json()["request_id"] for r in responses}) == 1
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == size - 1
        assert [j["request_id"] for j in history] == [responses[0].json()["request_id"]]


async def test_identical_idempotent_submits_at_once_are_one_job_and_no_429_on_sqlite(srv: LiveServer) -> None:
    await identical_bursts([srv.url], srv)


async def test_identical_idempotent_submits_at_once_over_two_replicas_on_redis(redis_db: Any,
                                                                                 tmp_path: Path) -> None:
    servers = [start_server("tiny", tmp_path / f"api{i}", extra=["--store", REDIS_DB_URL, "--no-worker"],
                            ready=False) for i in range(2)]
    try:
        await identical_bursts([s.url for s in servers], servers[0])
        assert not list(redis_db.scan_iter(match="kolors:ratelimit:*inflight*")), "every in-flight mark is cleared"
    finally:
        for s in servers:
            s.stop()
