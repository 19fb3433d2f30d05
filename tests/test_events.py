"""`GET /v2/requests/{id}/events` against a live embedded server (tiny model, steps slowed to 0.1 s
by `tests.engines:slow`, so a watcher can follow each one): the wire contract, reconnects with
Last-Event-ID, previews, ownership, watchers that go away, and the client and CLI on top of it.
The fleet case (Redis, another replica) and keep-alives are in `test_events_fleet.py`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kolors_api.client import AsyncClient, Client
from tests.conftest import LiveServer, start_server
from tests.engines import ENGINE_ENV
from tests.test_cli_generate import generate

STEP_SECONDS = "0.1"
JOB = {"prompt": "a lighthouse at dusk", "width": 512, "height": 512}
FRAME = re.compile(r"id: (\d+)\nevent: (queued|started|progress|completed|failed)\ndata: (\{[^\n]*\})\n\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server("tiny", tmp_path_factory.mktemp("events"),
                          env={**ENGINE_ENV, "KOLORS_TEST_STEP_SECONDS": STEP_SECONDS,
                               "KOLORS_TEST_FIRST_STEP_SECONDS": "1"},
                          extra=["--engine", "tests.pixel_engines:slow"])
    yield server
    server.stop()


@dataclass
class Frame:
    id: int
    event: str
    data: dict[str, Any]


def submit(srv: LiveServer, key: str | None = None, **params: Any) -> str:
    r = httpx.post(f"{srv.url}/v2/kolors", json={**JOB, **params}, headers=srv.headers(key), timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def watch(srv: LiveServer, request_id: str, *, key: str | None = None, previews: bool = False,
          last_id: int | None = None, until: Any = None) -> list[Frame]:
    """The frames of one connection, checked against the wire format, until the stream ends (or
    `until(frame)` is true: then the client hangs up)."""
    headers = srv.headers(key) | ({"Last-Event-ID": str(last_id)} if last_id is not None else {})
    url = f"{srv.url}/v2/requests/{request_id}/events" + ("?previews=1" if previews else "")
    frames: list[Frame] = []
    with httpx.stream("GET", url, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = ""
        for chunk in r.iter_text():
            text += chunk
            while (m := FRAME.match(text)) or text.startswith(": keep-alive\n\n"):
                if m is None:
                    text = text[len(": keep-alive\n\n"):]
                    continue
                text = text[m.end():]
                frames.append(Frame(int(m[1]), m[2], json.loads(m[3])))
                if until is not None and until(frames[-1]):
                    return frames
        assert text == "", f"not a frame: {text!r}"
    return frames


def steps(frames: list[Frame]) -> list[int]:
    """The steps the progress frames told, each once (the last step comes again with each phase after it)."""
    return list(dict.fromkeys(f.data["step"] for f in frames if f.event == "progress"))


def result(srv: LiveServer, request_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{srv.url}/v2/requests/{request_id}", headers=srv.headers(), timeout=30).json())


def webp_size(data_url: str) -> tuple[int, int]:
    prefix = "data:image/webp;base64,"
    assert data_url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))) as image:
        assert image.format == "WEBP"
        return image.size


def test_events_come_in_order_with_their_bodies_and_a_watcher_sees_every_step(srv: LiveServer) -> None:
    first = submit(srv, steps=20)
    second = submit(srv, steps=3)  # queued behind the first
    seen: dict[str, list[Frame]] = {}
    threads = [threading.Thread(target=lambda rid=rid: seen.__setitem__(rid, watch(srv, rid)))
               for rid in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    # the figure: every step of a 20-step job, then the phases after its last step, then its result
    assert steps(seen[first])[:20] == list(range(1, 21)) and set(steps(seen[first])[20:]) <= {20}
    assert seen[first][-1].event == "completed"
    frames = seen[second]
    names = [f.event for f in frames]
    assert names[0] == "queued" and names[-1] == "completed"
    assert names.index("started") == names.count("queued")
    assert frames[0].data == {"request_id": second, "status": "QUEUED", "queue_position": 0}
    assert frames[names.index("started")].data == {"request_id": second, "status": "PROCESSING"}
    progress = [f.data for f in frames if f.event == "progress"]
    assert progress[:3] == [{"request_id": second, "status": "PROCESSING", "step": s, "total_steps": 3,
                             "phase": phase} for s, phase in ((1, "denoising"), (2, "denoising"), (3, "decoding"))]
    # then, the step done, what it does (a watcher may skip a phase that passed meanwhile), in order
    later = [p["phase"] for p in progress[3:]]
    assert {p["step"] for p in progress[3:]} <= {3} and later == sorted(later, key=["encoding", "storing"].index)
    assert frames[-1].data == result(srv, second)
    ids = [f.id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_reconnect_with_last_event_id_resumes_and_ends_with_the_terminal_event(srv: LiveServer) -> None:
    rid = submit(srv, steps=20)
    before = watch(srv, rid, until=lambda f: f.event == "progress" and f.data["step"] >= 3)
    time.sleep(0.5)  # steps go on while nobody watches

    after = watch(srv, rid, last_id=before[-1].id)

    assert after[-1].event == "completed" and after[-1].data == result(srv, rid)
    assert "started" not in [f.event for f in after]  # told already
    resumed = steps(after)
    assert resumed and resumed[0] > before[-1].data["step"] and resumed[-1] == 20
    assert all(f.id > before[-1].id for f in after)
    # the same id again, after the end: the terminal event once more, at once
    again = watch(srv, rid, last_id=before[-1].id)
    assert [(f.id, f.event) for f in again] == [(after[-1].id, "completed")]


def test_a_finished_job_answers_its_terminal_event_at_once(srv: LiveServer) -> None:
    done = submit(srv, steps=1)
    watch(srv, done)
    cancelled = submit(srv, steps=20)
    httpx.post(f"{srv.url}/v2/requests/{cancelled}/cancel", headers=srv.headers(), timeout=30)
    watch(srv, cancelled)

    assert [(f.event, f.data) for f in watch(srv, done)] == [("completed", result(srv, done))]
    assert [(f.event, f.data) for f in watch(srv, cancelled)] == [
        ("failed", {"request_id": cancelled, "status": "FAILED", "error": "cancelled"})]


def test_a_job_cancelled_while_watched_ends_the_stream_with_failed(srv: LiveServer) -> None:
    rid = submit(srv, steps=20)
    first = watch(srv, rid, until=lambda f: f.event == "progress")

    def cancel_soon() -> None:
        time.sleep(0.3)
        httpx.post(f"{srv.url}/v2/requests/{rid}/cancel", headers=srv.headers(), timeout=30)

    threading.Thread(target=cancel_soon).start()
    frames = watch(srv, rid, last_id=first[-1].id)

    assert frames[-1].event == "failed"
    assert frames[-1].data == {"request_id": rid, "status": "FAILED", "error": "cancelled"}


def test_previews_come_only_when_asked_as_webp_of_an_eighth_of_the_size(srv: LiveServer) -> None:
    rid = submit(srv, steps=12, width=768, height=512)
    plain: list[Frame] = []
    watcher = threading.Thread(target=lambda: plain.extend(watch(srv, rid)))
    watcher.start()
    with_previews = watch(srv, rid, previews=True)
    watcher.join(timeout=120)

    previews = [f.data["preview"] for f in with_previews if "preview" in f.data]
    assert len(previews) >= 2  # every preview_every(12) = 2 steps, from the first one watched
    assert all(f.event == "progress" for f in with_previews if "preview" in f.data)
    assert {webp_size(p) for p in previews} == {(96, 64)}
    assert len(set(previews)) == len(previews)  # each a new picture
    assert plain and not any("preview" in f.data for f in plain)
    assert plain[-1].event == with_previews[-1].event == "completed"


def test_others_jobs_are_404_and_bad_headers_are_400(srv: LiveServer) -> None:
    rid = submit(srv, steps=1)
    other = srv.create_key(credits=10)["key"]
    url = f"{srv.url}/v2/requests/{rid}/events"

    for r, status in [
        (httpx.get(url, headers=srv.headers(other)), 404),
        (httpx.get(f"{srv.url}/v2/requests/no-such-job/events", headers=srv.headers()), 404),
        (httpx.get(url), 401),
        (httpx.get(url, headers=srv.headers() | {"Last-Event-ID": "soon"}), 400),
        (httpx.get(url + "?previews=yes", headers=srv.headers()), 400),
    ]:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"}
    assert "Last-Event-ID" in httpx.get(url, headers=srv.headers() | {"Last-Event-ID": "-1"}).json()["error"]


def open_streams(srv: LiveServer) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return float(next(x for x in text.splitlines() if x.startswith("kolors_event_streams ")).split()[1])


def test_many_watchers_of_one_job_and_those_that_go_away_cost_nothing(srv: LiveServer) -> None:
    rid = submit(srv, steps=20)
    quitters = [threading.Thread(target=watch, args=(srv, rid), kwargs={"until": lambda f: True})
                for _ in range(5)]
    ends: list[list[Frame]] = []
    stayers = [threading.Thread(target=lambda: ends.append(watch(srv, rid))) for _ in range(3)]
    for t in quitters + stayers:
        t.start()
    for t in quitters + stayers:
        t.join(timeout=120)

    assert [frames[-1].event for frames in ends] == ["completed"] * 3
    deadline = time.monotonic() + 10
    while open_streams(srv) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_streams(srv) == 0  # the five that hung up early hold nothing


def test_client_job_events_sync_and_async(srv: LiveServer) -> None:
    with Client(api_key=srv.key, base_url=srv.url) as client:
        job = client.submit_async("kolors", **JOB, steps=6)
        events = list(job.events(previews=True))
        assert events[-1].event == "completed" and events[-1].data == job.result()
        # each step once, then the last one again for each phase after it (encoding, storing)
        assert list(dict.fromkeys(e.data["step"] for e in events if e.event == "progress")) == list(range(1, 7))
        previews = [e.preview for e in events if e.preview is not None]
        assert previews and all(p[:4] == b"RIFF" and p[8:12] == b"WEBP" for p in previews)

    async def follow() -> list[str]:
        async with AsyncClient(api_key=srv.key, base_url=srv.url) as aclient:
            ajob = await aclient.submit_async("kolors", **JOB, steps=3)
            return [e.event async for e in ajob.events()]

    names = asyncio.run(follow())
    assert names[-1] == "completed" and names.count("progress") >= 3


def route_count(srv: LiveServer, route: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    pattern = re.compile(r'kolors_http_requests_total\{method="GET",route="' + re.escape(route) +
                         r'",status="200"\} (\S+)')
    return sum(float(m[1]) for m in pattern.finditer(text))


def test_cli_generate_draws_its_bar_from_the_event_stream(srv: LiveServer, tmp_path: Path) -> None:
    streams = route_count(srv, "/v2/requests/{request_id}/events")
    polls = route_count(srv, "/v2/requests/{request_id}/status")

    proc = generate(srv, "a lighthouse", "-o", "light.webp", "--steps", "4", "--width", "512", "--height", "512",
                    cwd=tmp_path, env={"FORCE_COLOR": "1", "COLUMNS": "100"})

    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "light.webp").read_bytes()[8:12] == b"WEBP"
    assert route_count(srv, "/v2/requests/{request_id}/events") == streams + 1
    assert route_count(srv, "/v2/requests/{request_id}/status") == polls  # no polling


class CuttingProxy:
    """A loopback HTTP proxy in front of `upstream`: everything passes, but each event stream is cut
    after its first event (`mode="cut"`, as a flaky network does) or answered 404 (`mode="404"`, as
    a server without the route does)."""

    def __init__(self, upstream: str, mode: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.forward()

            def do_POST(self) -> None:  # noqa: N802
                self.forward()

            def forward(self) -> None:
                events = "/events" in self.path
                if events:
                    proxy.streams += 1
                    if mode == "404":
                        self.send_response(404)
                        self.end_headers()
                        self.wfile.write(b'{"error": "unknown route"}')
                        return
                length = int(self.headers.get("content-length") or 0)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                with httpx.stream(self.command, upstream + self.path, headers=headers,
                                  content=self.rfile.read(length) if length else None, timeout=60) as r:
                    self.send_response(r.status_code)
                    for name, value in r.headers.items():
                        if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(name, value)
                    self.end_headers()
                    for chunk in r.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        if events and b"\n\n" in chunk:
                            return  # cut after the first event

        self.streams = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_client_events_resume_with_last_event_id_when_the_connection_is_cut(srv: LiveServer) -> None:
    proxy = CuttingProxy(srv.url, "cut")
    try:
        with Client(api_key=srv.key, base_url=proxy.url) as client:
            job = client.submit_async("kolors", **JOB, steps=20)
            events = list(job.events())
    finally:
        proxy.close()

    assert events[-1].event == "completed" and events[-1].data["request_id"] == job.request_id
    assert proxy.streams >= 3  # cut after each event, and reopened each time
    got = steps([Frame(int(e.id or 0), e.event, e.data) for e in events])
    assert len(got) >= 2 and got == sorted(set(got))  # resumed where it was, never back
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(set(ids))


def test_cli_generate_polls_when_the_server_has_no_event_stream(srv: LiveServer, tmp_path: Path) -> None:
    proxy = CuttingProxy(srv.url, "404")
    try:
        proc = generate(srv, "a lighthouse", "-o", "light.webp", "--steps", "2", "--width", "512", "--height",
                        "512", "--base-url", proxy.url, cwd=tmp_path)
    finally:
        proxy.close()

    assert proc.returncode == 0, proc.stderr
    assert proxy.streams == 1
    assert (tmp_path / "light.webp").read_bytes()[8:12] == b"WEBP"


# -- a stream lives only as long as its key: revoked on any replica, it ends before the next result
REVOCATIONS = ["disable", "delete", "rotate-webhook-secret", "demote"]
#: What a reconnect answers after each revocation (a rotated webhook secret leaves the key valid).
RECONNECT = {"disable": 403, "delete": 401, "rotate-webhook-secret": 200, "demote": 404}


def revoke(srv: LiveServer, key_id: str, how: str) -> None:
    url, h = f"{srv.url}/v1/admin/keys/{key_id}", srv.headers()
    r = {"disable": lambda: httpx.patch(url, json={"enabled": False}, headers=h),
         "delete": lambda: httpx.delete(url, headers=h),
         "rotate-webhook-secret": lambda: httpx.post(url + "/webhook-secret", headers=h),
         "demote": lambda: httpx.patch(url, json={"admin": False}, headers=h)}[how]()
    assert r.status_code == 200, r.text


def check_a_revoked_keys_stream_ends(watched: LiveServer, admin: LiveServer, how: str) -> None:
    """A key watches a long job on `watched`; `admin` (maybe another replica) revokes it at the first
    progress event: the stream ends while the job still runs, with no result (no output URLs)."""
    owner = admin.create_key()
    # "demote": an admin key watching another key's job loses its admin flag
    watcher = admin.create_key(admin=True) if how == "demote" else owner
    rid = submit(admin, owner["key"], steps=50)
    frames: list[Frame] = []
    stream = threading.Thread(target=watch, args=(watched, rid),
                              kwargs={"key": watcher["key"], "until": lambda f: frames.append(f) and False})
    stream.start()
    deadline = time.monotonic() + 120
    while not any(f.event == "progress" for f in frames):
        assert stream.is_alive() and time.monotonic() < deadline, frames
        time.sleep(0.02)
    revoke(admin, watcher["id"], how)
    stream.join(timeout=60)
    assert not stream.is_alive(), "the stream of a revoked key goes on"
    status = httpx.get(f"{admin.url}/v2/requests/{rid}/status", headers=admin.headers(), timeout=30).json()
    # it ended for the key, not because the job did (a disabled or deleted key's jobs are cancelled
    # too, at their next step: FAILED "cancelled", which its stream no longer tells)
    assert status["status"] == "PROCESSING" or (how in ("disable", "delete") and status["error"] == "cancelled"), status
    assert [f.event for f in frames if f.event in ("completed", "failed")] == []
    again = httpx.get(f"{watched.url}/v2/requests/{rid}/events", headers=watched.headers(watcher["key"]), timeout=30)
    assert again.status_code == RECONNECT[how], again.text[:300]
    httpx.post(f"{admin.url}/v2/requests/{rid}/cancel", headers=admin.headers(), timeout=30)


@pytest.mark.parametrize("how", REVOCATIONS)
def test_a_disabled_deleted_demoted_or_rotated_key_loses_its_streams(srv: LiveServer, how: str) -> None:
    check_a_revoked_keys_stream_ends(srv, srv, how)
