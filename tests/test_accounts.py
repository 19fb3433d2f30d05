"""Keys, accounts and request history over HTTP and the CLI; keys never rest or log in plaintext.

The servers run without a worker (`--no-worker`): jobs stay queued, nothing burns CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, LiveServer, flushed_redis, redis_db_url, start_server

SMALL = {"prompt": "a fox", "steps": 25, "width": 512, "height": 512}  # costs 0.25
ADMIN_ROUTES = [
    ("GET", "/v1/admin/keys", None),
    ("POST", "/v1/admin/keys", {"name": "x"}),
    ("PATCH", "/v1/admin/keys/{id}", {"credits": 1000}),
    ("DELETE", "/v1/admin/keys/{id}", None),
]
REDIS_DB_URL = redis_db_url(10)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Debug logging, so that the test that looks for keys in the log reads as much log as there can be.
    server = start_server("tiny", tmp_path_factory.mktemp("accounts"), extra=["--no-worker"], ready=False,
                          env={"KOLORS_API_LOG_LEVEL": "debug"})
    yield server
    server.stop()


@pytest.fixture
def admin(srv: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=30) as c:
        yield c


def create_key(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = client.post("/v1/admin/keys", json={"name": "user", **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


def as_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def test_admin_creates_lists_patches_and_deletes_keys(admin: httpx.Client) -> None:
    body = create_key(admin, name="alice", credits=10, rate_limit="10/min", max_concurrency=2)
    key, key_id = body["key"], body["id"]
    assert key.startswith("kol_") and body["prefix"] == key[:10]
    assert body["credits"] == 10 and body["rate_limit"] == "10/min" and body["max_concurrency"] == 2
    assert body["admin"] is False and body["enabled"] is True

    listed = admin.get("/v1/admin/keys")
    assert listed.status_code == 200
    assert key not in listed.text, "the key is shown only when it is created"
    rows = {row["id"]: row for row in listed.json()["data"]}
    assert "key" not in rows[key_id] and rows[key_id]["name"] == "alice"

    r = admin.patch(f"/v1/admin/keys/{key_id}", json={"add_credits": 2.5})
    assert r.status_code == 200 and r.json()["credits"] == 12.5
    r = admin.patch(f"/v1/admin/keys/{key_id}", json={"credits": 3})
    assert r.json()["credits"] == 3
    r = admin.patch(f"/v1/admin/keys/{key_id}", json={"name": "alice2", "rate_limit": "2/s", "max_concurrency": None})
    assert (r.json()["name"], r.json()["rate_limit"], r.json()["max_concurrency"]) == ("alice2", "2/s", None)
    r = admin.patch(f"/v1/admin/keys/{key_id}", json={"credits": None})
    assert r.json()["credits"] is None  # unlimited
    assert admin.get("/v1/account", headers=as_key(key)).json()["credits"] is None

    assert admin.patch(f"/v1/admin/keys/{key_id}", json={"owner": "x"}).status_code == 400
    assert admin.patch(f"/v1/admin/keys/{key_id}", json={"credits": -1}).status_code == 400
    assert admin.patch(f"/v1/admin/keys/{key_id}", json={"rate_limit": "lots"}).status_code == 400
    assert admin.post("/v1/admin/keys", json={"name": ""}).status_code == 400

    r = admin.delete(f"/v1/admin/keys/{key_id}")
    assert r.status_code == 200 and r.json() == {"id": key_id, "deleted": True}
    assert key_id not in {row["id"] for row in admin.get("/v1/admin/keys").json()["data"]}
    assert admin.get("/v1/account", headers=as_key(key)).status_code == 401
    assert admin.delete(f"/v1/admin/keys/{key_id}").status_code == 404
    assert admin.patch(f"/v1/admin/keys/{key_id}", json={"credits": 1}).status_code == 404


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[httpx.Client]:
    """An admin client on a server of its own, for tests whose failure could break the shared one."""
    server = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False)
    try:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
            yield client
    finally:
        server.stop()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_credits_are_refused_and_break_nothing(scratch: httpx.Client, number: str) -> None:
    admin = scratch
    # Python's json module reads these (1e400 is inf); a key holding one could never be rendered again.
    r = admin.post("/v1/admin/keys", content=f'{{"name": "nan", "credits": {number}}}')
    assert r.status_code == 400 and r.json()["error"].startswith("credits:"), r.text
    victim = create_key(admin, credits=1)
    r = admin.patch(f"/v1/admin/keys/{victim['id']}", content=f'{{"add_credits": {number}}}')
    assert r.status_code == 400 and r.json()["error"].startswith("add_credits:"), r.text
    listed = admin.get("/v1/admin/keys")
    assert listed.status_code == 200 and "nan" not in {k["name"] for k in listed.json()["data"]}


@pytest.mark.parametrize("field", ["credits", "max_concurrency"])
def test_huge_integers_are_400_not_500(scratch: httpx.Client, field: str) -> None:
    r = scratch.post("/v1/admin/keys", json={"name": "big", field: 10**24})
    assert r.status_code == 400 and r.json()["error"].startswith(f"{field}:"), r.text


def test_top_ups_cannot_overflow_a_balance(scratch: httpx.Client) -> None:
    admin = scratch
    victim = create_key(admin, credits=1)
    for _ in range(2):
        admin.patch(f"/v1/admin/keys/{victim['id']}", json={"add_credits": 1e308})  # refused or kept finite
    listed = admin.get("/v1/admin/keys")
    assert listed.status_code == 200, "every key can still be rendered"
    credits = {k["id"]: k["credits"] for k in listed.json()["data"]}[victim["id"]]
    assert credits is not None and math.isfinite(credits)


def test_a_keys_weight_is_set_on_create_and_patch_and_shown_everywhere(admin: httpx.Client) -> None:
    body = create_key(admin, name="heavy", weight=2)
    assert body["weight"] == 2 and create_key(admin, name="plain")["weight"] == 1
    rows = {row["id"]: row for row in admin.get("/v1/admin/keys").json()["data"]}
    assert rows[body["id"]]["weight"] == 2
    r = admin.patch(f"/v1/admin/keys/{body['id']}", json={"weight": 4.5})
    assert r.status_code == 200 and r.json()["weight"] == 4.5
    assert admin.get("/v1/account", headers=as_key(body["key"])).json()["limits"]["weight"] == 4.5
    for bad in (0, -1, "4", True, None, 10**24, 1e7):
        r = admin.patch(f"/v1/admin/keys/{body['id']}", json={"weight": bad})
        assert r.status_code == 400 and r.json()["error"].startswith("weight: must be a number greater than 0"), r.text
    for raw in ("NaN", "Infinity", "1e400", "-0.0"):
        r = admin.post("/v1/admin/keys", content=f'{{"name": "w", "weight": {raw}}}')
        assert r.status_code == 400 and r.json()["error"].startswith("weight:"), r.text
    assert admin.get("/v1/account", headers=as_key(body["key"])).json()["limits"]["weight"] == 4.5


def test_the_bootstrap_key_is_an_unlimited_admin(admin: httpx.Client) -> None:
    body = admin.get("/v1/account").json()
    assert body["admin"] is True and body["credits"] is None
    assert body["limits"] == {"rate_limit": None, "max_concurrency": None, "weight": 1.0}


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_a_user_key_is_403_on_each_admin_route(admin: httpx.Client, method: str, path: str,
                                                body: dict[str, Any] | None) -> None:
    user = create_key(admin)
    victim = create_key(admin, credits=1)
    r = admin.request(method, path.format(id=victim["id"]), json=body, headers=as_key(user["key"]))
    assert r.status_code == 403, r.text
    assert r.json() == {"error": "this route needs an admin key"}
    after = {k["id"]: k for k in admin.get("/v1/admin/keys").json()["data"]}
    assert after[victim["id"]]["credits"] == 1, "a refused admin call changes nothing"


@pytest.mark.parametrize(("method", "path", "body"), [
    *ADMIN_ROUTES,
    ("GET", "/v1/account", None),
    ("GET", "/v1/requests", None),
    ("POST", "/v2/kolors", SMALL),
    ("POST", "/v1/kolors", SMALL),
    ("POST", "/v1/images/generations", {"prompt": "a fox"}),
])
def test_a_disabled_key_is_403_everywhere(admin: httpx.Client, method: str, path: str,
                                          body: dict[str, Any] | None) -> None:
    disabled = create_key(admin, admin=True)  # even an admin key
    victim = create_key(admin, credits=1)
    assert admin.patch(f"/v1/admin/keys/{disabled['id']}", json={"enabled": False}).json()["enabled"] is False
    r = admin.request(method, path.format(id=victim["id"]), json=body, headers=as_key(disabled["key"]))
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    if path == "/v1/images/generations":  # OpenAI's error shape on the OpenAI route
        error = error["message"]
    assert error == "API key is disabled"
    # Enabled again, the same key works.
    admin.patch(f"/v1/admin/keys/{disabled['id']}", json={"enabled": True})
    assert admin.get("/v1/account", headers=as_key(disabled["key"])).status_code == 200


def test_missing_and_unknown_keys_are_401(srv: LiveServer) -> None:
    assert httpx.get(srv.url + "/v1/account").status_code == 401
    assert httpx.get(srv.url + "/v1/admin/keys", headers=as_key("kol_nope")).status_code == 401
    r = httpx.get(srv.url + "/v1/account", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, "OpenAI clients send Authorization: Bearer"


def test_account_reports_credits_limits_and_usage(admin: httpx.Client) -> None:
    user = create_key(admin, credits=10, rate_limit="100/min", max_concurrency=5)
    h = as_key(user["key"])
    for _ in range(2):
        assert admin.post("/v2/kolors", json=SMALL, headers=h).status_code == 200
    body = admin.get("/v1/account", headers=h).json()
    assert body.pop("webhook_secret").startswith("whsec_")  # tests/test_webhooks.py
    assert body == {
        "id": user["id"], "name": "user", "admin": False, "credits": 9.5,
        "limits": {"rate_limit": "100/min", "max_concurrency": 5, "weight": 1.0},
        "usage": {"credits_spent": 0, "credits_reserved": 0.5, "requests": 2, "running": 2},
    }


def test_history_is_own_only_newest_first_with_cursor_paging(admin: httpx.Client) -> None:
    alice, bob = create_key(admin), create_key(admin)
    mine = [admin.post("/v2/kolors", json=SMALL, headers=as_key(alice["key"])).json()["request_id"]
            for _ in range(5)]
    theirs = [admin.post("/v2/kolors", json=SMALL, headers=as_key(bob["key"])).json()["request_id"]
              for _ in range(2)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        r = admin.get("/v1/requests", params=params, headers=as_key(alice["key"]))
        assert r.status_code == 200, r.text
        page = r.json()
        pages += 1
        assert len(page["data"]) <= 2
        seen += [row["request_id"] for row in page["data"]]
        for row in page["data"]:
            assert row["status"] == "QUEUED" and row["model"] == "kolors" and row["cost"] == 0.25
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == mine[::-1], "newest first, each once"
    assert pages == 3
    assert not set(theirs) & set(seen)
    bob_rows = admin.get("/v1/requests", headers=as_key(bob["key"])).json()["data"]
    assert [row["request_id"] for row in bob_rows] == theirs[::-1]
    for bad in ("0", "101", "x"):
        r = admin.get("/v1/requests", params={"limit": bad}, headers=as_key(alice["key"]))
        assert r.status_code == 400 and r.json()["error"].startswith("limit:")


def run_cli(*args: str, data_dir: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(extra_env or {})}
    env.pop("KOLORS_API_BOOTSTRAP_KEY", None)
    return subprocess.run([sys.executable, "-m", "kolors_api.cli", "keys", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_keys_cli_creates_lists_and_revokes_on_the_live_data_dir(srv: LiveServer, admin: httpx.Client) -> None:
    made = run_cli("create", "--name", "cli-user", "--credits", "3", "--rate-limit", "5/min", data_dir=srv.data_dir)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("kol_") and len(made.stdout.splitlines()) == 1, "stdout is the key, alone"

    account = admin.get("/v1/account", headers=as_key(key)).json()
    assert (account["name"], account["credits"], account["limits"]["rate_limit"]) == ("cli-user", 3, "5/min")

    listed = run_cli("list", data_dir=srv.data_dir)
    assert listed.returncode == 0 and key not in listed.stdout
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert account["id"] in {row["id"] for row in rows}

    revoked = run_cli("revoke", account["id"], data_dir=srv.data_dir)
    assert revoked.returncode == 0, revoked.stderr
    assert admin.get("/v1/account", headers=as_key(key)).status_code == 403
    assert run_cli("revoke", "nope", data_dir=srv.data_dir).returncode == 1
    bad = run_cli("create", "--name", "x", "--rate-limit", "fast", data_dir=srv.data_dir)
    assert bad.returncode == 2 and "--rate-limit" in bad.stderr


def test_keys_cli_sets_and_updates_a_keys_weight(srv: LiveServer, admin: httpx.Client) -> None:
    made = run_cli("create", "--name", "weighted", "--weight", "3", data_dir=srv.data_dir)
    assert made.returncode == 0 and "weight=3" in made.stderr, made.stderr
    key = made.stdout.strip()
    account = admin.get("/v1/account", headers=as_key(key)).json()
    assert account["limits"]["weight"] == 3
    updated = run_cli("update", account["id"], "--weight", "0.5", data_dir=srv.data_dir)
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["weight"] == 0.5
    assert admin.get("/v1/account", headers=as_key(key)).json()["limits"]["weight"] == 0.5
    for flag in ("0", "inf", "nan", "-2"):
        bad = run_cli("update", account["id"], "--weight", flag, data_dir=srv.data_dir)
        assert bad.returncode == 2 and bad.stderr.startswith("error: --weight: must be a number"), bad.stderr
    assert run_cli("update", account["id"], data_dir=srv.data_dir).returncode == 2  # nothing to change
    assert run_cli("update", "nope", "--weight", "2", data_dir=srv.data_dir).returncode == 1


def test_no_plaintext_key_in_the_sqlite_files(srv: LiveServer, admin: httpx.Client) -> None:
    keys = [ADMIN_KEY]
    for _ in range(3):
        user = create_key(admin, credits=5)
        admin.post("/v2/kolors", json=SMALL, headers=as_key(user["key"]))
        keys.append(user["key"])
    files = [p for p in srv.data_dir.iterdir() if ".sqlite3" in p.name]
    assert any(p.name.endswith(".sqlite3") for p in files)
    for path in files:
        data = path.read_bytes()
        for key in keys:
            assert key.encode() not in data, f"{key[:10]}… in {path.name}"
            assert key[10:].encode() not in data, f"the secret part of {key[:10]}… in {path.name}"


def test_keys_never_reach_the_server_log(srv: LiveServer, admin: httpx.Client) -> None:
    user = create_key(admin, credits=1, rate_limit="1/min")
    h = as_key(user["key"])
    admin.post("/v2/kolors", json=SMALL, headers=h)
    admin.post("/v2/kolors", json=SMALL, headers=h)  # 429
    admin.post("/v2/kolors", json={"prompt": ""}, headers=h)  # 400
    admin.get("/v1/account", headers={"Authorization": f"Bearer {user['key']}"})
    admin.get("/v1/account", headers=as_key(user["key"] + "x"))  # 401
    admin.get("/v1/admin/keys", headers=h)  # 403
    log = srv.log()
    assert "/v1/account" in log, "the access log is on, so this test means something"
    for key in (ADMIN_KEY, user["key"]):
        assert key not in log and key[10:] not in log


def test_cors_is_off_by_default(srv: LiveServer) -> None:
    r = httpx.options(srv.url + "/v2/kolors", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(srv.url + "/v1/account", headers={"Origin": "https://app.example", **srv.headers()})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False,
                          env={"KOLORS_API_CORS_ORIGINS": "https://app.example, https://other.example"})
    try:
        preflight = httpx.options(server.url + "/v2/kolors", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        refused = httpx.options(server.url + "/v2/kolors", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in refused.headers
        with httpx.Client(base_url=server.url, headers=server.headers()) as admin:
            key = create_key(admin, rate_limit="5/min")
        r = httpx.post(server.url + "/v2/kolors", json=SMALL,
                       headers={"Origin": "https://other.example", **as_key(key["key"])})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://other.example"
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"ratelimit", "ratelimit-policy", "retry-after"} <= exposed
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        server.stop()


# -- the same promise on the Redis store


def redis_values(client: Any) -> Iterator[bytes]:
    """Every name and value in the db, read by type and also as DUMP payloads."""
    for name in client.scan_iter(count=500):
        yield name
        kind = client.type(name).decode()
        if kind == "string":
            yield client.get(name) or b""
        elif kind == "hash":
            for field, value in client.hgetall(name).items():
                yield field
                yield value
        elif kind == "list":
            yield from client.lrange(name, 0, -1)
        elif kind == "set":
            yield from client.smembers(name)
        elif kind == "zset":
            yield from client.zrange(name, 0, -1)
        elif kind == "stream":
            for entry_id, fields in client.xrange(name):
                yield entry_id
                for field, value in fields.items():
                    yield field
                    yield value
        yield client.dump(name) or b""


@pytest.fixture
def redis_db() -> Iterator[Any]:
    yield from flushed_redis(REDIS_DB_URL)


def test_no_plaintext_key_in_redis(redis_db: Any, tmp_path: Path) -> None:
    client = redis_db
    server = start_server("tiny", tmp_path / "api", extra=["--store", REDIS_DB_URL, "--no-worker"], ready=False)
    try:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as admin:
            keys = [ADMIN_KEY]
            for _ in range(2):
                user = create_key(admin, credits=5, rate_limit="10/min")
                assert admin.post("/v2/kolors", json=SMALL, headers=as_key(user["key"])).status_code == 200
                keys.append(user["key"])
            made = run_cli("create", "--name", "cli", "--store", REDIS_DB_URL, data_dir=tmp_path / "cli")
            assert made.returncode == 0, made.stderr
            keys.append(made.stdout.strip())
            assert admin.get("/v1/account", headers=as_key(keys[-1])).status_code == 200
        values = list(redis_values(client))
        assert len(values) > 10
        for key in keys:
            assert not any(key.encode() in v or key[10:].encode() in v for v in values), f"{key[:10]}… in Redis"
    finally:
        server.stop()
