"""Server-sent events of a job: `GET /v2/requests/{id}/events` (text/event-stream).

Each frame is ``id: <int>\\nevent: <name>\\ndata: <one-line JSON>\\n\\n``:

    queued     {"request_id", "status": "QUEUED", "queue_position"[, "attempt"]}   (again when the position
               moves, and when a job's lease ran out: its worker was lost, it waits for its next attempt)
    started    {"request_id", "status": "PROCESSING"}
    progress   {"request_id", "status": "PROCESSING", "step", "total_steps", "phase"[, "preview"]}
               (phase: denoising, then decoding, encoding, storing)
    completed  the body of GET /v2/requests/{id}
    failed     {"request_id", "status": "FAILED", "error"}

The stream ends after `completed` or `failed`; a job that already ended answers that event at once.
An idle stream gets a ``: keep-alive`` comment every `KEEPALIVE_SECONDS`.

Built only on `JobStore.wait` (every change of a job bumps its version), so it works the same in
embedded mode and in a fleet, where a watcher on any replica is woken by Redis pub/sub. An event's
id is derived from the job record alone, ``version * ID_BASE + kind``: every replica gives the same
change the same id, and a client that reconnects with ``Last-Event-ID`` gets the job's present state
at once when it changed since (at least the latest progress, and always the terminal event).
A watcher holds nothing but its own `wait`: when the client goes away the stream's task is
cancelled and the wait with it. A stream lives only as long as the key that opened it: every
`KEY_CHECK_SECONDS` (and before a terminal event, which carries signed output URLs) it re-reads the
key, and a key disabled, deleted, no longer admin (for another's job), or whose webhook secret was
rotated, ends its streams, on every replica (the store is shared), without a further event; a
reconnect is then 401, 403 or 404. A store outage mid-stream ends the stream (the client reconnects;
at connect the outage is a 503 with Retry-After, as on every route).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kolors_api.api.deps import CallerKey, Service, ServiceDep
from kolors_api.api.generation import progress_of, result_body, status_body
from kolors_api.api.models import errors
from kolors_api.errors import BadRequest
from kolors_api.jobs import ApiKey, Job, JobState, JobStore
from kolors_api.jobs.outage import is_outage
from kolors_api.schema import clip, decimal

router = APIRouter()
log = logging.getLogger("kolors_api.api")

#: Seconds between keep-alive comments on a stream with nothing to say (tests shorten it).
KEEPALIVE_SECONDS = 15.0
#: Seconds between re-reads of a queued job's position (other jobs' claims do not touch its version).
QUEUE_POLL_SECONDS = 1.0
#: A stream with previews tells the store it watches them for this long, renewed this often.
PREVIEW_WATCH_SECONDS = 10.0
PREVIEW_WATCH_RENEW = 3.0
#: Seconds between re-reads of the watcher's key (a revoked key's streams end within about this):
#: two reads of the store per stream (the key, its webhook secret), no writes.
KEY_CHECK_SECONDS = 0.5
#: The event names, in the order of their kind numbers (the low digits of an event id).
KINDS = ("queued", "started", "progress", "completed", "failed")
ID_BASE = 8
TERMINAL_KINDS = {JobState.COMPLETED: "completed", JobState.FAILED: "failed"}
PREVIEW_TYPE = "image/webp"


def event_id(version: int, kind: str) -> int:
    return version * ID_BASE + KINDS.index(kind)


def parse_event_id(raw: str | None) -> tuple[int, str | None]:
    """`Last-Event-ID` as (version, kind); (-1, None) when absent. Anything else is a 400."""
    if raw is None or not raw.strip():
        return -1, None
    value = decimal(raw.strip(), 18)
    if value is None or value % ID_BASE >= len(KINDS):
        raise BadRequest(f"Last-Event-ID: not an event id of this stream: {clip(raw)}")
    return value // ID_BASE, KINDS[value % ID_BASE]


def frame(version: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {event_id(version, kind)}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def wants_previews(raw: str | None) -> bool:
    if raw is None or raw in ("0", "false"):
        return False
    if raw in ("1", "true"):
        return True
    raise BadRequest(f"previews: must be 1 or 0, got {clip(raw)}")


@dataclass
class Grant:
    """The key that opened a stream, as it was then; `holds` says whether it still lets it watch."""

    key: ApiKey
    secret: str
    checked: float = field(default_factory=time.monotonic)

    async def holds(self, store: JobStore, job: Job) -> bool:
        self.checked = time.monotonic()
        latest = await store.get_key(self.key.id)
        if latest is None or not latest.enabled or latest.key_hash != self.key.key_hash:
            return False  # deleted, disabled, or another key under its id
        if job.key_id != latest.id and not latest.admin:
            return False  # an admin's stream of another's job, and the key is no longer admin
        return await store.current_webhook_secret(latest.id) == self.secret

    def due(self) -> bool:
        return time.monotonic() - self.checked >= KEY_CHECK_SECONDS


@dataclass
class Watch:
    """What one watcher has told its client so far."""

    svc: Service
    request: Request
    previews: bool
    grant: Grant
    #: The version of the last event sent (or the client's Last-Event-ID).
    version: int = -1
    state: JobState | None = None
    step: int = -1
    phase: str = ""
    position: int | None = None
    preview_step: int = 0
    #: When the queue position was last read.
    polled: float = 0.0

    async def frames(self, job: Job) -> list[str]:
        """The events that tell the client about `job`, beyond what it was told."""
        out: list[str] = []
        if job.state.terminal:
            kind = TERMINAL_KINDS[job.state]
            body = result_body(self.svc, self.request, job) if kind == "completed" else status_body(job)
            return [frame(job.version, kind, body)]
        changed = job.version > self.version
        if job.state == JobState.QUEUED:
            if not changed and self.state == JobState.QUEUED and time.monotonic() - self.polled < QUEUE_POLL_SECONDS:
                return out  # woken early (the key check): the position is re-read once a second
            self.polled = time.monotonic()
            position = await self.svc.store.queue_position(job.id)
            if position is not None and (changed or self.state != JobState.QUEUED or position != self.position):
                out.append(frame(job.version, "queued", status_body(job, position)))
                self.state, self.position, self.step = JobState.QUEUED, position, -1
        elif job.state == JobState.PROCESSING and changed:
            if self.state != JobState.PROCESSING:
                out.append(frame(job.version, "started", {"request_id": job.id, "status": job.state.value}))
                self.state, self.step, self.preview_step = JobState.PROCESSING, 0, 0
            if job.step > 0 and (job.step, job.phase) != (self.step, self.phase):
                out.append(frame(job.version, "progress", await self.progress(job)))
                self.step, self.phase = job.step, job.phase
        self.version = max(self.version, job.version)
        return out

    async def progress(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value, **progress_of(job)}
        if self.previews:
            latest = await self.svc.store.read_preview(job.id)
            if latest is not None and latest[0] > self.preview_step:
                self.preview_step = latest[0]
                body["preview"] = f"data:{PREVIEW_TYPE};base64,{base64.b64encode(latest[1]).decode()}"
        return body


async def stream(watch: Watch, job: Job) -> AsyncGenerator[str, None]:
    """The event stream of `job` until it ends, the client goes away, or the store fails."""
    svc = watch.svc
    sent = time.monotonic()
    marked = -PREVIEW_WATCH_RENEW
    try:
        while True:
            if (job.state.terminal or watch.grant.due()) and not await watch.grant.holds(svc.store, job):
                return  # the key was revoked: not one more event (a terminal one carries output URLs)
            if watch.previews and not job.state.terminal and time.monotonic() - marked >= PREVIEW_WATCH_RENEW:
                # the worker makes previews only while someone watches them
                await svc.store.watch_previews(job.id, PREVIEW_WATCH_SECONDS)
                marked = time.monotonic()
            frames = await watch.frames(job)
            if frames:
                yield "".join(frames)
                sent = time.monotonic()
            if job.state.terminal:
                return
            idle = min(max(0.0, KEEPALIVE_SECONDS - (time.monotonic() - sent)), KEY_CHECK_SECONDS)
            latest = await svc.store.wait(job.id, watch.version, idle)
            if latest is None:
                return  # expired while watched: nothing more will come
            job = latest
            if time.monotonic() - sent >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                sent = time.monotonic()
    except Exception as exc:
        # Headers are sent: end the stream cleanly, the client reconnects with Last-Event-ID.
        if is_outage(exc):
            svc.outage_seen(exc)
        else:
            log.exception("event stream of %s failed", job.id)


async def _counted(svc: Service, events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """`events`, counted in the open-streams gauge while it runs; closed when the client goes away."""
    svc.metrics.event_streams.inc()
    try:
        async for chunk in events:
            yield chunk
    finally:
        svc.metrics.event_streams.dec()
        with contextlib.suppress(Exception):
            await events.aclose()


EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": "the job's events, until it ends"}}


@router.get("/v2/requests/{request_id}/events", summary="Watch a request: server-sent events",
            response_class=StreamingResponse, responses={**EVENT_STREAM, **errors(400, 401, 403, 404, 503)},
            openapi_extra={"parameters": [
                {"name": "previews", "in": "query", "schema": {"type": "string", "enum": ["1", "0"]},
                 "description": "1: progress events carry a small webp preview when one is ready"},
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                 "description": "resume after this event (EventSource sends it when it reconnects)"}]})
async def request_events(request_id: str, request: Request, svc: ServiceDep, key: CallerKey) -> Response:
    previews = wants_previews(request.query_params.get("previews"))
    version, kind = parse_event_id(request.headers.get("last-event-id"))
    job = await svc.own_job(key, request_id)
    if version > job.version:
        version, kind = -1, None  # not an event of this job (it never had that version): start afresh
    # What a reconnecting client saw: its version and the state its last event told; a version it
    # saw already is not told again.
    told = {"queued": JobState.QUEUED, "started": JobState.PROCESSING, "progress": JobState.PROCESSING}
    # made now if the key has none yet, so that a rotation later is told from a first use
    grant = Grant(key, await svc.store.webhook_secret(key.id))
    watch = Watch(svc, request, previews, grant, version=version, state=told.get(kind or ""))
    return StreamingResponse(_counted(svc, stream(watch, job)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
