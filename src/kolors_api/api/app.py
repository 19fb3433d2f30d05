"""The FastAPI application: the Segmind-compatible v1/v2 routes, health and metrics.

This process never imports torch: the in-process worker (embedded mode) imports the engine
lazily, on its own thread, after the server is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kolors_api import __version__
from kolors_api.api.limits import RateLimits
from kolors_api.api.metrics import Metrics
from kolors_api.api.signing import Signer
from kolors_api.errors import (
    BadRequest,
    InsufficientCredits,
    KolorsAPIError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
)
from kolors_api.jobs import (
    ApiKey,
    InsufficientFunds,
    Job,
    JobStore,
    NewJob,
    QueueFull,
    TooManyRunning,
    hash_key,
    make_key_record,
    make_store,
    new_key,
)
from kolors_api.schema import MODELS, GenerateParams, price, validate
from kolors_api.settings import Settings

log = logging.getLogger("kolors_api.api")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Service:
    """What every route needs: settings, the store, the URL signer, metrics, the embedded worker."""

    settings: Settings
    store: JobStore
    metrics: Metrics = field(default_factory=Metrics)
    signer: Signer | None = None
    worker: Any = None
    worker_task: asyncio.Task[None] | None = None
    expiry_task: asyncio.Task[None] | None = None
    #: Pre-submit checks (rate limits…): (request, key, params) -> None; they raise to refuse and may
    #: leave headers for the answer in `request.state.extra_headers`.
    admission: list[Callable[[Request, ApiKey, GenerateParams], Awaitable[None]]] = field(default_factory=list)

    # -- submit, shared by v1 sync, v2 async and the OpenAI route
    async def submit(self, request: Request, key: ApiKey, model: str, body: Any, *, sync: bool = False,
                     webhook: str | None = None, idempotency_key: str | None = None) -> Job:
        """Validate, admit, price and enqueue; a sync caller is refused (503) when no worker is alive."""
        if model not in MODELS:
            raise NotFound(f"unknown model: {model}")
        params = validate(body)
        for check in self.admission:
            await check(request, key, params)
        if sync and (await self.store.stats()).workers_alive < 1:
            raise Unavailable("no worker alive", headers={"Retry-After": "10"})
        new = NewJob(model=model, params=params.to_dict(), cost=price(params, self.settings.unit_price),
                     key_id=key.id, webhook=webhook, idempotency_key=idempotency_key)
        try:
            return await self.store.submit(new, queue_cap=self.settings.queue_cap)
        except InsufficientFunds as exc:
            raise InsufficientCredits(str(exc)) from None
        except TooManyRunning as exc:
            raise RateLimited(str(exc), headers={"Retry-After": "1"}) from None
        except QueueFull as exc:
            raise Unavailable(str(exc), headers={"Retry-After": "5"}) from None

    def base_url(self, request: Request) -> str:
        return (self.settings.public_url or str(request.base_url)).rstrip("/")

    def output_urls(self, request: Request, job: Job) -> list[str]:
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
                except Exception:
                    # Another replica starting at the same moment may have added it first.
                    if await self.store.key_by_hash(hash_key(wanted)) is None:
                        raise
            return None
        if await self.store.list_keys():
            return None
        key = new_key()
        await self.store.add_key(make_key_record("admin", key, admin=True))
        return key


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"body: larger than {limit} bytes")
    if not data.strip():
        raise BadRequest("body: must be a JSON object, got nothing")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest("body: not valid JSON") from None


def error_response(exc: KolorsAPIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(settings: Settings | None = None, store: JobStore | None = None) -> FastAPI:
    """Build the app; `serve` runs it with uvicorn. Tests pass their own settings and store."""
    settings = settings or Settings()
    embedded = store is None and not settings.store.startswith(("redis://", "rediss://", "unix://"))
    store = store or make_store(settings.store, data_dir=settings.data_dir, retention=settings.retention_seconds,
                                max_deliveries=settings.max_deliveries, blob_dir=settings.blob_dir,
                                recover=embedded and settings.worker)
    svc = Service(settings=settings, store=store)
    svc.admission.append(RateLimits(settings.store))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.store.open()
        svc.signer = Signer(await svc.store.shared_secret())
        created = await svc.ensure_bootstrap_key()
        if created:
            print(f"Created an admin API key (shown only now): {created}", flush=True)  # noqa: T201
        svc.expiry_task = asyncio.create_task(_expire_loop(svc))
        if settings.worker:
            from kolors_api.safety import build_safety
            from kolors_api.worker import Worker, WorkerConfig, load_engine

            svc.worker = Worker(
                svc.store, lambda: load_engine(settings.model, settings.data_dir, settings.device),
                WorkerConfig(lease_seconds=settings.lease_seconds, heartbeat_seconds=settings.heartbeat_seconds),
                on_job_done=lambda seconds, outcome: svc.metrics.job_duration.labels(outcome).observe(seconds),
                safety=build_safety(settings))
            svc.worker_task = asyncio.create_task(svc.worker.run())
        try:
            yield
        finally:
            svc.expiry_task.cancel()
            if svc.worker is not None and svc.worker_task is not None:
                svc.worker.stop()  # the job in hand finishes; queued jobs stay queued
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(svc.worker_task, 120)
            await svc.store.close()

    app = FastAPI(title="kolors-api", version=__version__, lifespan=lifespan,
                  description="Segmind- and OpenAI-compatible text-to-image API for Kolors.")
    app.state.service = svc

    @app.exception_handler(KolorsAPIError)
    async def _api_error(request: Request, exc: KolorsAPIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"not found: {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            response = await call_next(request)
        except Exception:
            log.exception("internal error on %s %s", request.method, request.url.path)
            response = JSONResponse({"error": "internal error"}, status_code=500)
        route = request.scope.get("route")
        svc.metrics.requests.labels(request.method, getattr(route, "path", "unmatched"),
                                    str(response.status_code)).inc()
        for name, value in {**SECURITY_HEADERS, **getattr(request.state, "extra_headers", {})}.items():
            response.headers.setdefault(name, value)
        return response

    from kolors_api.api import admin, generation, openai_images, system

    app.include_router(system.router)
    app.include_router(admin.router)
    app.include_router(openai_images.router)
    app.include_router(generation.router)
    if settings.cors_origins:
        # Off by default; keys travel in headers, never cookies, so no credentials.
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")
                                                          if o.strip()],
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-Id",
                                           "X-Seed", "X-Inference-Time"])
    return app


async def _expire_loop(svc: Service) -> None:
    interval = min(60.0, max(1.0, svc.settings.retention_seconds / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            await svc.store.expire()
        except Exception:
            log.exception("expiry sweep failed")

