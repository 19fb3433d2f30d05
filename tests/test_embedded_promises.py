"""What the README promises of the embedded `serve` (SQLite + in-process worker), checked live:
charged once across a kill -9, the generated admin key printed once, KOLORS_API_PUBLIC_URL,
KOLORS_API_UNIT_PRICE, and the drain of the job in hand on SIGTERM.

Every wait is on a state, never a fixed sleep: the machine may be loaded.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, start_server
from tests.pixel_engines import ENGINE_ENV

# Seconds of work (50 steps of the torch-free engine at 0.1 s: the server is stopped a poll after its
# first step, so it is surely in flight), yet well inside the 120 s that `serve` gives the job in hand
# to finish on SIGTERM.
SLOW = {"prompt": "a slow cathedral", "steps": 50, "width": 1024, "height": 1024}  # costs 2
#: start_server's arguments for the torch-free engine (pixels are not the point here): up in a second.
PIXELS: dict[str, Any] = {"env": {**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": "0.1"},
                          "extra": ["--engine", "tests.pixel_engines:slow"]}
SMALL = {"prompt": "a small boat", "steps": 2, "width": 512, "height": 512}  # costs 0.02
TERMINAL = {"COMPLETED", "FAILED"}


def status(server: LiveServer, request_id: str, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers=server.headers(key), timeout=30)
    assert r.status_code in (200, 422), r.text
    return dict(r.json())


def poll(server: LiveServer, request_id: str, until: set[str], key: str | None = None,
         timeout: float = 240) -> dict[str, Any]:
    """The status body once the job is in one of `until` (a running job must also have made a step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = status(server, request_id, key)
        if body["status"] in until and (body["status"] != "PROCESSING" or body["progress"]["step"] >= 1):
            return body
        assert server.proc.poll() is None, f"the server exited:\n{server.log()}"
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached {until}:\n{server.log()}")


def submit(server: LiveServer, body: dict[str, Any], key: str | None = None) -> str:
    r = httpx.post(server.url + "/v2/kolors", json=body, headers=server.headers(key), timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def account(server: LiveServer, key: str) -> dict[str, Any]:
    r = httpx.get(server.url + "/v1/account", headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def db_rows(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows straight from the server's SQLite file (read while the server is down, or between commits)."""
    conn = sqlite3.connect(data_dir / "kolors-api.sqlite3", timeout=30)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def restart(server: LiveServer, model: Path | str, log_name: str, **kwargs: Any) -> LiveServer:
    port = int(urlsplit(server.url).port or 0)
    return start_server(model, server.data_dir, port=port, log_name=log_name, **kwargs)


# -- kill -9 with a credit-limited job in flight: completed after restart, charged exactly once


def test_kill_9_mid_job_then_restart_completes_it_and_charges_the_key_once(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "data", **PIXELS)
    try:
        key = server.create_key(credits=10)
        running = submit(server, SLOW, key["key"])
        queued = submit(server, SMALL, key["key"])
        poll(server, running, {"PROCESSING"}, key["key"])
        assert status(server, queued, key["key"])["status"] == "QUEUED"
        assert account(server, key["key"])["credits"] == pytest.approx(10 - 2 - 0.02)
        server.kill(signal.SIGKILL)
        # Killed in flight: the store says so, and nothing was refunded or captured yet.
        states = dict(db_rows(server.data_dir, "SELECT id, state FROM jobs"))
        assert states == {running: "PROCESSING", queued: "QUEUED"}

        server = restart(server, "tiny", "server2.log", **PIXELS)
        for request_id in (running, queued):
            assert poll(server, request_id, TERMINAL, key["key"])["status"] == "COMPLETED"
        result = httpx.get(f"{server.url}/v2/requests/{running}", headers=server.headers(key["key"])).json()
        assert httpx.get(result["output"][0], timeout=30).status_code == 200

        acct = account(server, key["key"])
        assert acct["credits"] == pytest.approx(10 - 2 - 0.02)
        assert acct["usage"] == {"credits_spent": pytest.approx(2.02), "credits_reserved": 0, "requests": 2,
                                 "running": 0}
        history = httpx.get(server.url + "/v1/requests", headers=server.headers(key["key"])).json()["data"]
        assert {(h["request_id"], h["status"], h["cost"]) for h in history} == {
            (running, "COMPLETED", 2), (queued, "COMPLETED", 0.02)}
    finally:
        server.stop()
    # Per job one reserve and one capture (of nothing more), no refund, no second charge; the balance
    # is the ledger's sum.
    ledger = db_rows(server.data_dir, "SELECT request_id, kind, amount FROM ledger WHERE key_id=? ORDER BY seq",
                     key["id"])
    assert sorted((rid, kind, round(amount, 6)) for rid, kind, amount in ledger) == sorted([
        ("", "topup", 10), (running, "reserve", -2), (running, "capture", 0),
        (queued, "reserve", -0.02), (queued, "capture", 0)])
    [(balance,)] = db_rows(server.data_dir, "SELECT credits FROM keys WHERE id=?", key["id"])
    assert balance == pytest.approx(sum(amount for *_, amount in ledger))


# -- the generated admin key: printed once, on the first start with an empty data dir

PRINTED_KEY = re.compile(r"Created an admin API key \(shown only now\): (kol_\S+)")


def test_with_no_bootstrap_key_the_first_start_prints_an_admin_key_once(tmp_path: Path) -> None:
    no_key: dict[str, str | None] = {"KOLORS_API_BOOTSTRAP_KEY": None}
    server = start_server("tiny", tmp_path / "data", env=no_key, extra=["--no-worker"], ready=False)
    try:
        printed = PRINTED_KEY.findall(server.log())
        assert len(printed) == 1, server.log()
        [admin_key] = printed
        # ...and the playground's URL, where that key is to be pasted
        assert f"Playground: {server.url}/ (paste the key above there)" in server.log()
        # It is an admin key: it makes keys, and it is the only key there is.
        made = httpx.post(server.url + "/v1/admin/keys", json={"name": "alice"}, headers={"x-api-key": admin_key})
        assert made.status_code == 201, made.text
        keys = httpx.get(server.url + "/v1/admin/keys", headers={"x-api-key": admin_key}).json()["data"]
        assert sorted((k["name"], k["admin"]) for k in keys) == [("admin", True), ("alice", False)]
        server.stop()

        server = restart(server, "tiny", "server2.log", env=no_key, extra=["--no-worker"], ready=False)
        second = (server.data_dir / "server2.log").read_text(errors="replace")
        assert "Created an admin API key" not in second
        assert "kol_" not in second
        assert f"Playground: {server.url}/ (paste an API key there)" in second
        r = httpx.get(server.url + "/v1/admin/keys", headers={"x-api-key": admin_key})
        assert r.status_code == 200, r.text
        assert sorted(k["name"] for k in r.json()["data"]) == ["admin", "alice"]
    finally:
        server.stop()


# -- KOLORS_API_PUBLIC_URL and KOLORS_API_UNIT_PRICE, on one server

PUBLIC_URL = "https://kolors.example.com:8443/api"
UNIT_PRICE = 3.0
PRICED = {"prompt": "two koi", "number_of_images": 2, "steps": 10, "width": 512, "height": 512}
# 2 images × 10/25 steps × (512²/1024²) area = 0.2 units, × 3 credits a unit
PRICED_COST = 0.6


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server("tiny", tmp_path_factory.mktemp("configured"), extra=["--engine", "tests.pixel_engines:pixels"],
                       env={**ENGINE_ENV, "KOLORS_API_PUBLIC_URL": PUBLIC_URL + "/",
                            "KOLORS_API_UNIT_PRICE": str(UNIT_PRICE)})
    yield srv
    srv.stop()


def test_links_are_built_from_the_public_url_not_the_host_header(configured: LiveServer) -> None:
    headers = {**configured.headers(), "Host": "attacker.example.org", "X-Forwarded-Host": "attacker.example.org"}
    submitted = httpx.post(configured.url + "/v2/kolors", json=PRICED, headers=headers, timeout=30)
    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    request_id = body["request_id"]
    assert body["status_url"] == f"{PUBLIC_URL}/v2/requests/{request_id}/status"
    assert body["response_url"] == f"{PUBLIC_URL}/v2/requests/{request_id}"

    poll(configured, request_id, TERMINAL)
    result = httpx.get(f"{configured.url}/v2/requests/{request_id}", headers=headers, timeout=30).json()
    assert result["status"] == "COMPLETED"
    assert len(result["output"]) == 2
    for i, url in enumerate(result["output"]):
        assert url.startswith(f"{PUBLIC_URL}/v2/requests/{request_id}/outputs/{i}.webp?exp="), url
        # The signature covers the path the server sees: a proxy in front serving PUBLIC_URL forwards it.
        parts = urlsplit(url)
        local = f"{configured.url}{parts.path.removeprefix('/api')}?{parts.query}"
        image = httpx.get(local, timeout=30)
        assert image.status_code == 200 and image.content[8:12] == b"WEBP"

    openai = httpx.post(configured.url + "/v1/images/generations", headers=headers, timeout=300,
                        json={"prompt": "a koi", "size": "512x512", "response_format": "url",
                              "steps": 2})
    assert openai.status_code == 200, openai.text
    assert openai.json()["data"][0]["url"].startswith(PUBLIC_URL + "/v2/requests/")


def test_the_unit_price_scales_what_a_request_costs(configured: LiveServer) -> None:
    models = httpx.get(configured.url + "/v1/models", headers=configured.headers()).json()["data"]
    assert models[0]["pricing"]["unit_price"] == UNIT_PRICE
    assert models[0]["pricing"]["default_request"] == UNIT_PRICE  # the seed request is one unit

    short = configured.create_key(credits=0.5)
    refused = httpx.post(configured.url + "/v2/kolors", json=PRICED, headers=configured.headers(short["key"]))
    assert refused.status_code == 406
    assert refused.json() == {"error": f"insufficient credits: need {PRICED_COST:g}, have 0.5"}

    key = configured.create_key(credits=10)
    request_id = submit(configured, PRICED, key["key"])
    assert poll(configured, request_id, TERMINAL, key["key"])["status"] == "COMPLETED"
    acct = account(configured, key["key"])
    assert acct["credits"] == pytest.approx(10 - PRICED_COST)
    assert acct["usage"] == {"credits_spent": pytest.approx(PRICED_COST), "credits_reserved": 0, "requests": 1,
                             "running": 0}
    history = httpx.get(configured.url + "/v1/requests", headers=configured.headers(key["key"])).json()["data"]
    assert [h["cost"] for h in history] == [pytest.approx(PRICED_COST)]


# -- SIGTERM: the job in hand completes before the process exits; a queued job stays queued


def test_sigterm_drains_the_running_job_and_leaves_the_queued_one_for_the_next_start(tmp_path: Path) -> None:
    server = start_server("tiny", tmp_path / "data", **PIXELS)
    try:
        running = submit(server, SLOW)
        queued = submit(server, SMALL)
        poll(server, running, {"PROCESSING"})
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not exit after SIGTERM:\n{server.log()}") from None
        # uvicorn exits by re-raising the signal it caught, once its shutdown is complete
        assert code in (0, -signal.SIGTERM), server.log()
        assert "Application shutdown complete" in server.log()
        # Drained: the running job finished before the process went; nothing claimed the queued one.
        rows = {rid: (state, started, finished) for rid, state, started, finished in db_rows(
            server.data_dir, "SELECT id, state, started_at, finished_at FROM jobs")}
        assert rows[running][0] == "COMPLETED", server.log()
        assert rows[queued] == ("QUEUED", None, None)

        server = restart(server, "tiny", "server2.log", **PIXELS)
        assert poll(server, queued, TERMINAL)["status"] == "COMPLETED"
        history = {h["request_id"]: h for h in httpx.get(server.url + "/v1/requests",
                                                         headers=server.headers()).json()["data"]}
        # The drained job was not run again: the same start and end as at shutdown.
        assert history[running]["status"] == "COMPLETED"
        assert (history[running]["started_at"], history[running]["finished_at"]) == rows[running][1:]
        result = httpx.get(f"{server.url}/v2/requests/{running}", headers=server.headers()).json()
        assert httpx.get(result["output"][0], timeout=30).status_code == 200
    finally:
        server.stop()
