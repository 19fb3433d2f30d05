"""What an adversarial probe broke (issue 28), where the process is the point: `serve` on loopback,
real receivers that accept and never answer, real sockets that trickle their headers."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, LiveServer, free_port, start_server, wait_for_status, wait_up
from tests.pixel_engines import serving
from tests.receiver import Receiver

SMALL = {"prompt": "a fox", "steps": 2, "width": 512, "height": 512}
HOOKS = {"KOLORS_API_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "KOLORS_API_WEBHOOK_RETRY_DELAYS": "0.5,0.5"}


@pytest.fixture
def dead_receiver() -> Iterator[Receiver]:
    r = Receiver(statuses=[0])  # accepts, reads the request, never answers
    yield r
    r.close()


def cancelled_jobs_with_webhooks(srv: LiveServer, url: str, n: int) -> list[str]:
    """`n` queued jobs (no worker runs them) with a webhook for "failed", each cancelled: a delivery
    each, at once (a cancel ends the job FAILED "cancelled" and is refunded)."""
    ids = []
    for _ in range(n):
        r = httpx.post(srv.url + "/v2/kolors", headers=srv.headers(),
                       json={**SMALL, "webhook": url, "webhook_events_filter": ["failed"]})
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])
        assert httpx.post(f"{srv.url}/v2/requests/{ids[-1]}/cancel", headers=srv.headers()).status_code == 200
    return ids


def pending_deliveries(data_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(data_dir / "kolors-api.sqlite3") as db:
        return [(r[0], r[1], r[2]) for r in db.execute("SELECT job_id, state, attempts FROM webhook_deliveries")]


# -- issue 24: SIGTERM never waits on a dead receiver
def test_sigterm_exits_within_the_grace_with_deliveries_to_a_dead_receiver_pending(
        tmp_path: Path, dead_receiver: Receiver) -> None:
    """Deliveries hang on a receiver that never answers while others churn (a refused port, retried
    at once): `serve` still exits within its grace, and the deliveries stay in the outbox."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    env: dict[str, str | None] = {**HOOKS, "KOLORS_API_SHUTDOWN_GRACE_SECONDS": "3",
                                  "KOLORS_API_WEBHOOK_RETRY_DELAYS": "0," * 5000 + "0"}
    srv = start_server("tiny", tmp_path, extra=["--no-worker"], ready=False, env=env)
    try:
        hanging = cancelled_jobs_with_webhooks(srv, dead_receiver.url, 12)
        churning = cancelled_jobs_with_webhooks(srv, refused, 40)
        deadline = time.monotonic() + 30
        while dead_receiver.hanging < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead_receiver.hanging >= 4  # tries in flight, hanging on the receiver
        time.sleep(1)
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - sent
        assert took < 3 + 2, f"serve took {took:.1f}s to exit after SIGTERM with a grace of 3s"
    finally:
        srv.stop()
        closed.close()
    rows = pending_deliveries(tmp_path)
    assert sorted(job for job, _, _ in rows) == sorted(hanging + churning)
    assert {state for _, state, _ in rows} == {"pending"}  # delivered after the next start


# -- 3. slow clients do not take the server down
def start_limited(tmp_path: Path, nofile: int, env: dict[str, str]) -> LiveServer:
    """`serve --no-worker` with at most `nofile` open files (a default Linux limit is 1024)."""
    port = free_port()
    log_path = tmp_path / "server.log"
    full_env = {**os.environ, "KOLORS_API_BOOTSTRAP_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kolors_api.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path),
         "--no-worker"], env=full_env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))  # noqa: PLW1509
    srv = LiveServer(url=f"http://127.0.0.1:{port}", data_dir=tmp_path, proc=proc, log_path=log_path)
    wait_up(srv, ready=False)
    return srv


class Tricklers:
    """`n` connections that each send a request head one header line a second (never finishing it),
    or with `body`, a whole head with a valid key and then a body one byte a second."""

    def __init__(self, url: str, n: int, *, body: bool = False) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        for _ in range(n):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, int(port)))
                if body:
                    s.sendall(f"POST /v2/kolors HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {ADMIN_KEY}\r\n"
                              "content-type: application/json\r\ncontent-length: 100000\r\n\r\n{".encode())
                else:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.send(b" " if s.fileno() >= 0 else b"")

    def open_ones(self) -> int:
        """How many of the connections the server has not closed yet."""
        n = 0
        for s in self.socks:
            try:
                n += s.recv(65536) != b""
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("body", [False, True], ids=["trickled-heads", "trickled-bodies"])
def test_hundreds_of_trickling_connections_leave_healthz_and_a_real_request_answering(
        tmp_path: Path, body: bool) -> None:
    deadlines = {"KOLORS_API_HEADER_TIMEOUT_SECONDS": "4", "KOLORS_API_BODY_TIMEOUT_SECONDS": "4"}
    srv = start_limited(tmp_path, 512, deadlines)
    tricklers = Tricklers(srv.url, 700, body=body)
    try:
        time.sleep(2)  # the tricklers are in, sending
        for _ in range(3):
            for method, path, kw in (("GET", "/healthz", {}), ("POST", "/v2/kolors", {"json": SMALL})):
                started = time.monotonic()
                r = httpx.request(method, srv.url + path, headers=srv.headers(), timeout=5, **kw)  # type: ignore[arg-type]
                took = time.monotonic() - started
                assert r.status_code == 200 and took < 1.0, f"{method} {path}: {r.status_code} in {took:.2f}s"
        # and the server cuts off what trickles past its deadline
        deadline = time.monotonic() + 30
        while tricklers.open_ones() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert tricklers.open_ones() == 0
    finally:
        tricklers.close()
        srv.stop()


# -- 8. a blob-store outage at commit keeps the images and stores them when it is back
def test_an_s3_outage_at_commit_keeps_the_images_and_completes_once_without_a_lost_worker(tmp_path: Path) -> None:
    from tests.s3_helpers import start_moto

    s3 = start_moto()
    bucket = s3.bucket()
    # leases of 2 s and 3 deliveries: an outage of 12 s outlived them all before the fix
    # the torch-free engine: where the images go, and when, is the point, not the pixels
    srv = start_server("tiny", tmp_path / "srv", **serving("pixels", extra=["--blob-url", f"s3://{bucket}/o"], env={
        **s3.env, "KOLORS_API_LEASE_SECONDS": "2", "KOLORS_API_HEARTBEAT_SECONDS": "0.5"}))
    try:
        user = srv.create_key(credits=10)
        s3.stop()
        r = httpx.post(srv.url + "/v2/kolors", headers=srv.headers(user["key"]), json={**SMALL, "seed": 3})
        request_id = r.json()["request_id"]
        deadline = time.monotonic() + 120
        while "could not be stored" not in srv.log():
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.2)
        time.sleep(12)
        s3.start()
        wait_for_status(srv, user["key"], request_id, lambda b: b["status"] in ("COMPLETED", "FAILED"), timeout=120)
        result = httpx.get(f"{srv.url}/v2/requests/{request_id}", headers=srv.headers(user["key"])).json()
        assert result["status"] == "COMPLETED", result
        assert httpx.get(result["output"][0]).status_code == 200
        account = httpx.get(srv.url + "/v1/account", headers=srv.headers(user["key"])).json()
        assert account["credits"] == pytest.approx(10 - 0.02)  # charged once
        log = srv.log()
        assert log.count(f"job {request_id} could not be stored") == 1, log[-3000:]  # the model ran once
        assert "worker lost" not in log and f"job {request_id} stored after" in log
    finally:
        srv.stop()
        s3.stop()
