"""What an adversarial probe broke (issue 28), where the process is the point: `serve` on loopback,
real receivers that accept and never answer, real sockets that trickle their headers."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_server
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
    env = {**HOOKS, "KOLORS_API_SHUTDOWN_GRACE_SECONDS": "3", "KOLORS_API_WEBHOOK_RETRY_DELAYS": "0," * 5000 + "0"}
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
