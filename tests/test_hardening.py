"""What an adversarial probe broke (issue 9), one battery per class of input: odd numerals, lone
surrogates and invisible prompts, unbounded echoes and non-finite numbers, rate limits a store
cannot hold, untrusted Host headers, signatures in the access log.

Each battery tries several members of its class, and the server must answer every one with a 4xx
`{"error": ...}` that changes nothing, never a 500 and never a traceback in its log. The servers run
without a worker (`--no-worker`); the Redis tests use db 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kolors_api.jobs.redis_keys import DEFAULT_PREFIX, Keys
from tests.conftest import LiveServer, flushed_redis, redis_db_url, start_server

SMALL = {"prompt": "a fox", "steps": 1, "width": 512, "height": 512}
REDIS_DB_URL = redis_db_url(4)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("hardening"), extra=["--no-worker"], ready=False)
    yield server
    assert "Traceback" not in server.log(), "a bad input must never log a traceback"
    server.stop()


@pytest.fixture
def admin(srv: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=30) as client:
        yield client


def refused(r: httpx.Response, status: int = 400, words: str = "") -> str:
    """The error of a refusal: the status, a JSON `{"error": str}` body, short."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    if isinstance(error, dict):  # the OpenAI route's shape
        error = error["message"]
    assert isinstance(error, str) and words in error, error
    assert len(r.content) < 1024, f"an error body of {len(r.content)} bytes"
    return error


# -- 3. numerals: one strict parser (ASCII digits, bounded, range-checked) wherever a number is text
ODD_NUMERALS = ["²", "٣", "１", "9" * 23, "9" * 5000, "-1", "+1", "1e3", " 1", "0x10", ""]


@pytest.mark.parametrize("exp", ODD_NUMERALS)
def test_an_odd_exp_on_an_output_url_is_401_without_a_key(srv: LiveServer, exp: str) -> None:
    r = httpx.get(f"{srv.url}/v2/requests/x/outputs/0.webp", params={"exp": exp, "sig": "x"})
    refused(r, 401)


@pytest.mark.parametrize("stem", ["²", "٣", "9" * 23, "9" * 5000, "-1", "1e3"])
def test_an_odd_output_index_is_404(admin: httpx.Client, stem: str) -> None:
    job = admin.post("/v2/kolors", json=SMALL).json()["request_id"]
    refused(admin.get(f"/v2/requests/{job}/outputs/{stem}.webp"), 404, "unknown output")


@pytest.mark.parametrize("name", ["limit", "cursor"])
@pytest.mark.parametrize("value", ODD_NUMERALS[:-1] + ["abc"])
def test_an_odd_history_limit_or_cursor_is_400_naming_it(admin: httpx.Client, name: str, value: str) -> None:
    refused(admin.get("/v1/requests", params={name: value}), 400, f"{name}: ")


def test_a_good_cursor_pages(admin: httpx.Client, srv: LiveServer) -> None:
    key = srv.create_key()
    h = {"x-api-key": key["key"]}
    ids = [admin.post("/v2/kolors", json=SMALL, headers=h).json()["request_id"] for _ in range(3)]
    page = admin.get("/v1/requests", params={"limit": "2"}, headers=h).json()
    rest = admin.get("/v1/requests", params={"limit": "2", "cursor": page["next_cursor"]}, headers=h).json()
    assert [j["request_id"] for j in page["data"] + rest["data"]] == ids[::-1]


@pytest.mark.parametrize("size", ["²x²", "٣x٣", "１０２４x１０２４", "9" * 5000 + "x1024", "1024x" + "9" * 23,
                                  "1024X1024", "-1024x1024", "1024x1024 "])
def test_an_odd_openai_size_is_400(admin: httpx.Client, size: str) -> None:
    refused(admin.post("/v1/images/generations", json={"prompt": "a fox", "size": size}), 400, "size")


@pytest.mark.parametrize("rate", ["²/min", "٣/s", "１/s", "99999999999999999999/s", "100001/min", "0/s", "-1/s",
                                  "10/fortnight", "10/" + "s" * 5000, "1.5/s"])
def test_a_rate_limit_out_of_bounds_is_400_and_no_key_is_made(admin: httpx.Client, rate: str) -> None:
    before = len(admin.get("/v1/admin/keys").json()["data"])
    refused(admin.post("/v1/admin/keys", json={"name": "r", "rate_limit": rate}), 400, "rate_limit: must look like")
    key = admin.post("/v1/admin/keys", json={"name": "r"}).json()
    refused(admin.patch(f"/v1/admin/keys/{key['id']}", json={"rate_limit": rate}), 400, "rate_limit")
    assert len(admin.get("/v1/admin/keys").json()["data"]) == before + 1


# -- 4. an accepted rate limit never breaks a key, on either store
@pytest.fixture
def redis_client() -> Iterator[Any]:
    yield from flushed_redis(REDIS_DB_URL)


@pytest.fixture
def fleet(redis_client: Any, tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path / "fleet", extra=["--store", REDIS_DB_URL, "--no-worker"], ready=False)
    yield server
    server.stop()
    assert "Traceback" not in server.log()


EDGE_RATES = ["100000/s", "100000/hour", "1/s", " 7 / min "]


def check_edge_rates(srv: LiveServer) -> None:
    for rate in EDGE_RATES:
        key = srv.create_key(rate_limit=rate)
        r = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers={"x-api-key": key["key"]})
        assert r.status_code == 200, (rate, r.text)
        assert "RateLimit" in r.headers


def test_every_accepted_rate_limit_works_on_sqlite(srv: LiveServer) -> None:
    check_edge_rates(srv)


def test_every_accepted_rate_limit_works_on_redis(fleet: LiveServer, redis_client: Any) -> None:
    check_edge_rates(fleet)
    # A limit stored before the bounds existed is refused plainly, not a 500 on every request.
    key = fleet.create_key()
    redis_client.hset(Keys(DEFAULT_PREFIX).key(key["id"]), "rate_limit", "99999999999999999999/s")
    r = httpx.post(fleet.url + "/v2/kolors", json=SMALL, headers={"x-api-key": key["key"]})
    refused(r, 403, "rate_limit is not valid")


# -- 5. strings that are not Unicode text, and prompts that draw nothing
SURROGATE_BODIES = [
    ("/v2/kolors", '{"prompt": "\\ud800 x"}', "prompt"),
    ("/v2/kolors", '{"prompt": "a fox", "negative_prompt": "\\udfff"}', "negative_prompt"),
    ("/v2/kolors", '{"prompt": "\\udc00\\ud800 reversed pair"}', "prompt"),
    ("/v2/kolors", '{"prompt": "a fox", "scheduler": "\\ud83d"}', "scheduler"),
    ("/v2/kolors", '{"prompt": "a fox", "\\ud800": 1}', "body"),
    ("/v1/kolors", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/images/generations", '{"prompt": "\\ud800 x"}', "prompt"),
    ("/v1/images/generations", '{"prompt": "a fox", "user": "\\udbff"}', "user"),
    ("/v1/admin/keys", '{"name": "\\ud800"}', "name"),
    ("/v1/admin/keys", '{"name": "ok", "rate_limit": "\\ud800/s"}', "rate_limit"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_any_string_is_400_naming_the_field(admin: httpx.Client, path: str, body: str,
                                                               field: str) -> None:
    before = (len(admin.get("/v1/admin/keys").json()["data"]), admin.get("/v1/account").json()["usage"])
    r = admin.post(path, content=body.encode(), headers={"content-type": "application/json"})
    refused(r, 400, f"{field}: must be valid Unicode text")
    assert (len(admin.get("/v1/admin/keys").json()["data"]), admin.get("/v1/account").json()["usage"]) == before


def test_a_patch_with_a_lone_surrogate_is_400_and_changes_nothing(admin: httpx.Client) -> None:
    key = admin.post("/v1/admin/keys", json={"name": "kept"}).json()
    r = admin.patch(f"/v1/admin/keys/{key['id']}", content=b'{"name": "\\ud800"}',
                    headers={"content-type": "application/json"})
    refused(r, 400, "name: must be valid Unicode text")
    names = {k["id"]: k["name"] for k in admin.get("/v1/admin/keys").json()["data"]}
    assert names[key["id"]] == "kept"


def test_valid_pairs_and_astral_characters_are_text(admin: httpx.Client) -> None:
    r = admin.post("/v2/kolors", content='{"prompt": "a fox \\ud83e\\udd8a 🦊"}'.encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("prompt", ["\u200b\ufeff", " \u200b ", "\u2800", "\u3164", "\u200d\u2060\u00ad",
                                    "\t\n\u3000", "\u202e\u202c"])
@pytest.mark.parametrize("path", ["/v2/kolors", "/v1/images/generations"])
def test_a_prompt_of_invisible_characters_is_empty(admin: httpx.Client, path: str, prompt: str) -> None:
    refused(admin.post(path, json={"prompt": prompt}), 400, "prompt: must not be empty")


# -- 8. error messages quote at most ~100 characters; NaN and Infinity are not finite numbers
HUGE = "x" * 900_000


@pytest.mark.parametrize(("path", "body"), [
    ("/v2/kolors", {"prompt": "a fox", "scheduler": HUGE}),
    ("/v2/kolors", {"prompt": "a fox", "output_format": HUGE}),
    ("/v2/kolors", {"prompt": "a fox", HUGE: 1}),
    ("/v2/kolors", {"prompt": "a fox", **{f"f{i}{'y' * 1000}": 1 for i in range(50)}}),
    ("/v1/images/generations", {"prompt": "a fox", "size": HUGE}),
    ("/v1/images/generations", {"prompt": "a fox", "response_format": HUGE}),
    ("/v1/admin/keys", {"name": "n", "rate_limit": HUGE}),
    ("/v1/admin/keys", {"name": "n", "credits": HUGE}),
])
def test_a_huge_bad_value_is_not_echoed(admin: httpx.Client, path: str, body: dict[str, Any]) -> None:
    refused(admin.post(path, json=body), 400)


@pytest.mark.parametrize("path", ["/v2/requests/" + "r" * 5000, "/v2/requests/" + "r" * 5000 + "/status",
                                  "/v1/" + "m" * 5000])
def test_a_huge_path_is_not_echoed(admin: httpx.Client, path: str) -> None:
    method = "POST" if path.startswith("/v1/") else "GET"
    refused(admin.request(method, path, json=SMALL if method == "POST" else None), 404)


def test_a_huge_query_value_is_not_echoed(admin: httpx.Client) -> None:
    refused(admin.get("/v1/requests", params={"limit": "9" * 5000}), 400, "limit")
    refused(admin.get("/v1/requests", params={"cursor": "c" * 5000}), 400, "cursor")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_named_as_such(admin: httpx.Client, literal: str) -> None:
    for path, field, template in [("/v2/kolors", "cfg", '{"prompt": "a fox", "cfg": %s}'),
                                  ("/v1/images/generations", "cfg", '{"prompt": "a fox", "cfg": %s}'),
                                  ("/v1/admin/keys", "credits", '{"name": "n", "credits": %s}')]:
        r = admin.post(path, content=(template % literal).encode(), headers={"content-type": "application/json"})
        refused(r, 400, f"{field}: must be a finite number")


# -- 7. absolute URLs only for hosts this server knows
@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:8000",
                                  "localhost.evil.example", "x" * 3000])
def test_an_unknown_host_header_is_400_everywhere_but_the_probes(srv: LiveServer, host: str) -> None:
    h = {**srv.headers(), "host": host}
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        before = len(client.get("/v1/requests", params={"limit": "100"}, headers=srv.headers()).json()["data"])
        for method, path in [("POST", "/v2/kolors"), ("GET", "/v1/requests"), ("GET", "/v2/requests/x"),
                             ("POST", "/v1/images/generations"), ("GET", "/v1/account"), ("GET", "/")]:
            r = client.request(method, path, json=SMALL, headers=h)
            error = refused(r, 400, "is not an allowed host")
            assert "KOLORS_API_PUBLIC_URL" in error
        after = len(client.get("/v1/requests", params={"limit": "100"}, headers=srv.headers()).json()["data"])
        assert after == before, "a refused host submits nothing"
        assert client.get("/healthz", headers=h).status_code == 200
        assert client.get("/metrics", headers=h).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST"])
def test_loopback_hosts_build_the_links(srv: LiveServer, host: str) -> None:
    port = srv.url.rpartition(":")[2]
    r = httpx.post(srv.url + "/v2/kolors", json=SMALL, headers={**srv.headers(), "host": f"{host}:{port}"})
    assert r.status_code == 200, r.text
    assert r.json()["status_url"].lower().startswith(f"http://{host.lower()}:{port}/v2/requests/")


def test_allowed_hosts_adds_names(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False,
                          env={"KOLORS_API_ALLOWED_HOSTS": "api.example, other.example"})
    try:
        ok = httpx.post(server.url + "/v2/kolors", json=SMALL, headers={**server.headers(), "host": "api.example"})
        assert ok.status_code == 200 and ok.json()["response_url"].startswith("http://api.example/v2/requests/")
        bad = httpx.post(server.url + "/v2/kolors", json=SMALL, headers={**server.headers(), "host": "evil.example"})
        refused(bad, 400, "is not an allowed host")
    finally:
        server.stop()


# -- 9. the access log never holds a working signature
def test_the_access_log_drops_the_signature(srv: LiveServer) -> None:
    secret = "5ec4e7" * 10
    for query in (f"exp=1900000000&sig={secret}", f"sig={secret}&exp=1900000000", f"sig={secret}"):
        httpx.get(f"{srv.url}/v2/requests/abc/outputs/0.webp?{query}")
    log = srv.log()
    assert secret not in log
    assert log.count("/v2/requests/abc/outputs/0.webp?exp=1900000000 ") == 2, log[-2000:]
    assert "/v2/requests/abc/outputs/0.webp HTTP/1.1" in log
