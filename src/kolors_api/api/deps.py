"""What the routes need, in one place: the `Service`, the body reader, and the FastAPI dependencies.

Routes import this module (and `models`); nothing here imports a route or `app.py`, so the
package has one direction: `app` → routers → `deps` → store, schema, errors.

    ServiceDep   the app's Service
    CallerKey    the caller's enabled API key (401/403 otherwise)
    AdminKey     the same, and it must be an admin key (403 otherwise)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import ClientDisconnect, Request

from kolors_api.api.auth import authenticate
from kolors_api.api.intake import Intake, Picture
from kolors_api.api.limits import InFlight
from kolors_api.api.metrics import Metrics
from kolors_api.api.signing import Signer
from kolors_api.api.ssrf import Blocked, Policy, Resolver, check_webhook_url, system_resolve
from kolors_api.errors import (
    BadRequest,
    JobFailed,
    KolorsAPIError,
    NotFound,
    PayloadTooLarge,
    SyncTimeout,
    Unavailable,
    from_store,
)
from kolors_api.jobs import (
    ApiKey,
    IdempotencyMismatch,
    InsufficientFunds,
    Job,
    JobState,
    JobStore,
    NewJob,
    StoreError,
    hash_key,
    make_key_record,
    new_key,
)
from kolors_api.jobs.base import micro
from kolors_api.jobs.outage import Outage, is_outage
from kolors_api.schema import (
    IMG2IMG,
    MODELS,
    GenerateParams,
    check_text,
    clip,
    decimal,
    price,
    split_webhook,
    validate_request,
    with_inputs,
)
from kolors_api.settings import Settings

log = logging.getLogger("kolors_api.api")

#: The longest Idempotency-Key taken.
MAX_IDEMPOTENCY_KEY = 255

#: A pre-submit check (rate limits…): (request, key, params) -> None; it raises to refuse and may
#: leave headers for the answer in `request.state.extra_headers`.
Admission = Callable[[Request, ApiKey, GenerateParams], Awaitable[None]]


@dataclass
class Finished:
    """A sync run that ended COMPLETED: the job and its images."""

    job: Job
    images: list[bytes]

    def b64(self) -> list[str]:
        return [base64.b64encode(img).decode() for img in self.images]


@dataclass
class Service:
    """What every route needs: settings, the store, the URL signer, metrics, the engine processes."""

    settings: Settings
    store: JobStore
    metrics: Metrics = field(default_factory=Metrics)
    signer: Signer | None = None
    #: `serve`'s engine processes (`kolors_api.worker.supervisor.Supervisor`), None without a worker.
    engines: Any = None
    #: When the shutdown must be over (monotonic), once a signal asked for it (`begin_shutdown`).
    shutdown_deadline: float | None = None
    #: The webhook delivery runner (`kolors_api.api.delivery.WebhookRunner`), set by the lifespan.
    webhook_runner: Any = None
    expiry_task: asyncio.Task[None] | None = None
    admission: list[Admission] = field(default_factory=list)
    #: The store's outage, logged once (see `kolors_api.jobs.outage`), and the task that sees it end.
    outage: Outage = field(default_factory=lambda: Outage(logging.getLogger("kolors_api.api")))
    probe_task: asyncio.Task[None] | None = None
    #: The webhook SSRF guard's allow-list and resolver (tests put a stub resolver here).
    webhook_policy: Policy = field(default_factory=Policy)
    resolve: Resolver = system_resolve
    webhook_task: asyncio.Task[None] | None = None
    #: One submit at a time per Idempotency-Key (set by `create_app`; None: no such guard).
    inflight: InFlight | None = None
    #: Image URLs' allow-list (the webhooks' guard, `fetch_allow_hosts`) and the intake, made on first
    #: use (with `resolve` as it is then: tests put a stub resolver there first).
    fetch_policy: Policy = field(default_factory=Policy)
    _intake: Intake | None = None

    @property
    def intake(self) -> Intake:
        if self._intake is None:
            self._intake = Intake(self.fetch_policy, self.resolve, max_bytes=self.settings.max_image_bytes,
                                  timeout=self.settings.fetch_timeout_seconds)
        return self._intake

    def takes_images(self, model: str | None) -> bool:
        """Whether requests of `model` may carry pictures (a larger body is taken then)."""
        return model == IMG2IMG or (model in MODELS and bool(self.settings.ip_adapter))

    def body_limit(self, model: str | None) -> int:
        """The largest JSON body of a route: `max_body_bytes`, plus two base64 pictures where taken."""
        extra = 2 * (self.settings.max_image_bytes * 4 // 3 + 4) if self.takes_images(model) else 0
        return self.settings.max_body_bytes + extra

    def begin_shutdown(self) -> None:
        """A signal asked the server to stop: the grace starts now and the engines stop claiming."""
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self.settings.shutdown_grace_seconds
            if self.engines is not None:
                self.engines.drain()
            if self.webhook_runner is not None:
                self.webhook_runner.stop()

    def shutdown_left(self) -> float:
        """Seconds left of the shutdown grace (all of it when no signal started it)."""
        if self.shutdown_deadline is None:
            return self.settings.shutdown_grace_seconds
        return max(0.0, self.shutdown_deadline - time.monotonic())

    def outage_seen(self, exc: BaseException) -> None:
        """Note an outage error (the first one logs) and watch, by pinging, for the store's return."""
        self.outage.failed(exc)
        if self.probe_task is None or self.probe_task.done():
            self.probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while self.outage.down:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                if await self.store.ping():
                    self.outage.ok()

    # -- submit and the sync run, shared by v1 sync, v2 async and the OpenAI route
    async def submit(self, request: Request, key: ApiKey, model: str, body: Any, *, sync: bool = False) -> Job:
        """Validate, admit, price and enqueue; a sync caller is refused (503) when no worker is alive."""
        if model not in MODELS:
            raise NotFound(f"unknown model: {clip(model)}")
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise BadRequest(f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY} characters, "
                             f"got {len(idempotency_key)}")
        if idempotency_key is None:
            return await self._submit(request, key, model, body, None, "", sync)
        # same route, model and body as the key's first request, or a 422 (a random seed is drawn later)
        digest = hashlib.sha256(json.dumps([request.url.path, model, body], sort_keys=True).encode()).hexdigest()
        if self.inflight is None:
            return await self._submit(request, key, model, body, idempotency_key, digest, sync)
        # a repeat sent while its original is still being admitted waits for the original's answer
        # (it would otherwise be admitted as new: counted by the rate limit, maybe refused with 429)
        idem = idempotency_key
        async with self.inflight.claim(key.id, idem, lambda: self._seen(key.id, idem, digest)):
            return await self._submit(request, key, model, body, idempotency_key, digest, sync)

    async def _submit(self, request: Request, key: ApiKey, model: str, body: Any, idempotency_key: str | None,
                      digest: str, sync: bool) -> Job:
        # a repeat skips the checks a new request passes (credits, rate limits, a live worker): it is
        # no new request, and its answer must not change (the store decides, atomically, below)
        repeat = idempotency_key is not None and await self._seen(key.id, idempotency_key, digest)
        body, webhook, events = split_webhook(body)
        checked = validate_request(body, model, ip_adapter=bool(self.settings.ip_adapter))
        if webhook is not None:
            try:
                await check_webhook_url(webhook, self.webhook_policy, self.resolve)
            except Blocked as exc:
                raise BadRequest(f"webhook: {exc}") from None
        pictures: dict[str, Picture] = {}
        for name, value in checked.images.items():
            pictures[name] = await self.intake.take(name, value)
        params = with_inputs(checked, {name: (p.sha256, p.width, p.height) for name, p in pictures.items()})
        cost = price(params, self.settings.unit_price)
        if not repeat:
            await self._admit(request, key, params, cost, sync=sync)
        new = NewJob(model=model, params=params.to_dict(), cost=cost, key_id=key.id, idempotency_key=idempotency_key,
                     request_hash=digest, webhook=webhook, webhook_events=events)
        job = await self._store_job(new, {p.sha256: p.data for p in pictures.values()})
        if job.id != new.id:
            request.state.extra_headers = {**getattr(request.state, "extra_headers", {}), "Idempotent-Replayed": "true"}
        return job

    async def _store_job(self, new: NewJob, inputs: dict[str, bytes]) -> Job:
        """Submit `new` with its input pictures stored first (a worker may claim it at once); they go
        again when the store refuses the job or answers with another (an Idempotency-Key's first)."""
        if inputs:
            await self.store.write_inputs(new.id, inputs)
        try:
            job = await self.store.submit(new, queue_cap=self.settings.queue_cap)
        except BaseException as exc:
            if inputs:
                with contextlib.suppress(Exception):
                    await self.store.remove_inputs(new.id)
            if isinstance(exc, StoreError):
                raise from_store(exc) from None
            raise
        if inputs and job.id != new.id:
            await self.store.remove_inputs(new.id)
        return job

    async def _admit(self, request: Request, key: ApiKey, params: GenerateParams, cost: float, *, sync: bool) -> None:
        """The checks a new request passes before the store: credits, admission (rate limits), a live worker."""
        if key.credits is not None and micro(key.credits) < micro(cost):
            # Refused before the rate limits count it (the store checks again, atomically).
            raise from_store(InsufficientFunds(cost, key.credits))
        for check in self.admission:
            await check(request, key, params)
        if sync and (await self.store.stats()).workers_alive < 1:
            raise Unavailable("no worker alive", headers={"Retry-After": "10"})

    async def _seen(self, key_id: str, idempotency_key: str, digest: str) -> bool:
        """True when the key was used before for this very request; 422 when for another."""
        seen = await self.store.idempotent_request(key_id, idempotency_key)
        if seen is not None and seen[1] != digest:
            raise from_store(IdempotencyMismatch())
        return seen is not None

    async def run_sync(self, request: Request, key: ApiKey, model: str, body: Any) -> Finished:
        """Submit, wait until the job ends (504 at the sync deadline), 422 when it FAILED, read the images.

        Once the job is stored, every answer but the images names it: `request_id` in the body and
        the `X-Request-Id` header, and a 503 (the store went away while waiting) says that the job
        was accepted and goes on, so that a client fetches it instead of paying for it twice."""
        started = time.monotonic()
        job = await self.submit(request, key, model, body, sync=True)
        self.metrics.request_stage.labels("accept").observe(time.monotonic() - started)
        try:
            return await self._wait_sync(request, job)
        except KolorsAPIError as exc:
            raise accepted(exc, job.id) from None
        except Exception as exc:
            if is_outage(exc):
                self.outage_seen(exc)
                raise Unavailable(
                    f"store unreachable while waiting; request {job.id} was accepted and goes on: fetch it "
                    f"with GET /v2/requests/{job.id}",
                    extra={"request_id": job.id, **self.links(request, job)},
                    headers={"Retry-After": "5", "X-Request-Id": job.id}) from None
            log.exception("internal error while waiting for %s", job.id)
            raise KolorsAPIError(
                f"internal error while waiting; request {job.id} was accepted and goes on: fetch it with "
                f"GET /v2/requests/{job.id}",
                extra={"request_id": job.id, **self.links(request, job)}, headers={"X-Request-Id": job.id}) from None

    async def _wait_sync(self, request: Request, job: Job) -> Finished:
        deadline = time.monotonic() + self.settings.sync_timeout_seconds
        while not job.state.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncTimeout(
                    f"request {job.id} did not finish within {self.settings.sync_timeout_seconds:g}s; "
                    "it goes on: fetch it from response_url",
                    extra={"request_id": job.id, "status": job.state.value, **self.links(request, job)})
            latest = await self.store.wait(job.id, job.version, left, done=True)  # not woken by each step
            if latest is None:
                raise NotFound(f"unknown request: {job.id}")
            job = latest
        stage = self.metrics.request_stage
        if job.finished_at is not None:  # from the engine's store write to this waiter's wake-up
            stage.labels("wake").observe(max(0.0, time.time() - job.finished_at))
        if job.state == JobState.FAILED:
            raise failed(job)
        reading = time.monotonic()
        images = await asyncio.gather(*(self.store.read_output(job.id, i) for i in range(job.outputs)))
        if any(img is None for img in images):
            raise NotFound(f"unknown request: {job.id}")
        stage.labels("read").observe(time.monotonic() - reading)
        return Finished(job, [img for img in images if img is not None])

    async def own_job(self, key: ApiKey, job_id: str) -> Job:
        """The caller's job (admins see all); anything else is 404, so ids of others do not leak."""
        job = await self.store.get(job_id)
        if job is None or (job.key_id != key.id and not key.admin):
            raise NotFound(f"unknown request: {clip(job_id)}")
        return job

    # -- absolute URLs
    def base_url(self, request: Request | None) -> str:
        """PUBLIC_URL, else the request's (a webhook has none: the bound address)."""
        if self.settings.public_url or request is None:
            host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
            return (self.settings.public_url or f"http://{host}:{self.settings.port}").rstrip("/")
        return request_base_url(request)

    def links(self, request: Request, job: Job) -> dict[str, str]:
        base = f"{self.base_url(request)}/v2/requests/{job.id}"
        return {"status_url": f"{base}/status", "response_url": base}

    def output_urls(self, request: Request | None, job: Job) -> list[str]:
        assert self.signer is not None
        base = self.base_url(request)
        urls = []
        for i in range(job.outputs):
            path = f"/v2/requests/{job.id}/outputs/{i}.{job.ext}"
            urls.append(f"{base}{path}?{self.signer.query(path, job.expires_at)}")
        return urls

    async def ensure_bootstrap_key(self) -> str | None:
        """Env KOLORS_API_BOOTSTRAP_KEY sets the first admin key; with no key at all, make one.

        Returns the new key when one was generated (the caller prints it once)."""
        wanted = self.settings.bootstrap_key
        if wanted:
            if await self.store.key_by_hash(hash_key(wanted)) is None:
                try:
                    await self.store.add_key(make_key_record("bootstrap", wanted, admin=True))
                except StoreError:
                    # Another replica starting at the same moment may have added it first.
                    if await self.store.key_by_hash(hash_key(wanted)) is None:
                        raise
            return None
        if await self.store.list_keys():
            return None
        key = new_key()
        await self.store.add_key(make_key_record("admin", key, admin=True))
        return key


def request_base_url(request: Request) -> str:
    """`str(request.base_url)` without its last "/", remembered for the few (scheme, Host, server,
    root path) a server sees: every submit's answer builds two URLs from it."""
    scope = request.scope
    return _base_url_of(scope.get("scheme", "http"), host_header(scope), tuple(scope.get("server") or ()) or None,
                        scope.get("app_root_path", scope.get("root_path", "")))


def host_header(scope: Mapping[str, Any]) -> bytes | None:
    """The request's raw Host header (an ASGI scope's), or None."""
    return next((value for name, value in scope["headers"] if name == b"host"), None)


@functools.lru_cache(maxsize=256)
def _base_url_of(scheme: str, host: bytes | None, server: tuple[Any, ...] | None, root_path: str) -> str:
    scope = {"type": "http", "scheme": scheme, "server": server, "root_path": root_path, "path": "/",
             "query_string": b"", "headers": [] if host is None else [(b"host", host)]}
    return str(Request(scope).base_url).rstrip("/")


def accepted(exc: KolorsAPIError, job_id: str) -> KolorsAPIError:
    """`exc`, an answer about an accepted job: its `request_id` in the body and `X-Request-Id`."""
    exc.extra.setdefault("request_id", job_id)
    exc.headers.setdefault("X-Request-Id", job_id)
    return exc


def failed(job: Job) -> JobFailed:
    """A FAILED job as the 422 it is served as."""
    return JobFailed(job.error or "failed", extra={"request_id": job.id, "status": "FAILED"})


async def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(service)]


async def caller_key(request: Request, svc: ServiceDep) -> ApiKey:
    return await authenticate(svc.store, request)


async def admin_key(request: Request, svc: ServiceDep) -> ApiKey:
    return await authenticate(svc.store, request, admin=True)


CallerKey = Annotated[ApiKey, Depends(caller_key)]
AdminKey = Annotated[ApiKey, Depends(admin_key)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refusing more than `limit` before reading them all."""
    length = decimal(request.headers.get("content-length"))
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes")
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise PayloadTooLarge(f"body: larger than {limit} bytes")
    except ClientDisconnect:  # nobody reads the answer; not a fault of ours (no stack trace in the log)
        raise BadRequest("body: the client went away before sending all of it") from None
    return bytes(data)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    data = await read_body(request, limit)
    if not data.strip():
        raise BadRequest("body: must be a JSON object, got nothing")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest("body: not valid JSON") from None
    check_text(body)
    return body


async def json_body(request: Request, svc: ServiceDep) -> Any:
    """The request's JSON body (at most `max_body_bytes`; more where pictures are taken), as a dependency."""
    return await read_json(request, svc.body_limit(request.path_params.get("model")))


JsonBody = Annotated[Any, Depends(json_body)]
