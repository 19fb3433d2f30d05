"""The FastAPI application: the Segmind-compatible v1/v2 routes, health and metrics.

This process never imports torch and never runs engine code: with a worker (`serve`'s default)
it starts one engine process per device (`kolors_api.worker.supervisor`) and watches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kolors_api import __version__
from kolors_api.api.admin import router as admin_router
from kolors_api.api.delivery import WebhookRunner
from kolors_api.api.deps import Service, host_header
from kolors_api.api.docs import add_docs
from kolors_api.api.events import router as events_router
from kolors_api.api.fastpath import SubmitFastPath, submit_route
from kolors_api.api.generation import router as generation_router
from kolors_api.api.generation import webhook_body
from kolors_api.api.limits import InFlight, RateLimits
from kolors_api.api.openai_edits import EDITS_PATH
from kolors_api.api.openai_edits import router as edits_router
from kolors_api.api.openai_images import OPENAI_PARAMS, OPENAI_PATH
from kolors_api.api.openai_images import router as openai_router
from kolors_api.api.playground import add_playground, playground_url
from kolors_api.api.signing import Signer
from kolors_api.api.ssrf import Policy
from kolors_api.api.system import router as system_router
from kolors_api.errors import BadRequest, KolorsAPIError, openai_error, store_unavailable
from kolors_api.jobs import JobStore, make_store
from kolors_api.jobs.outage import is_outage
from kolors_api.schema import clip
from kolors_api.settings import Settings, retry_delays
from kolors_api.worker.messages import JobDone

log = logging.getLogger("kolors_api.api")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


#: Routes that build no URL and that probes and scrapers reach by IP: no Host check.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


def error_json(request: Request, status: int, message: str, *, extra: dict[str, Any] | None = None,
               headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error answer: `{"error": message, **extra}` (Segmind's shape), or OpenAI's error object on
    the OpenAI route (its SDK shows `message`), `param` naming the request field that is wrong."""
    body: dict[str, Any]
    if request.url.path in (OPENAI_PATH, EDITS_PATH):
        field, sep, _ = message.partition(": ")
        param = OPENAI_PARAMS.get(field, field) if sep and field.replace("_", "").isalnum() and status == 400 \
            else None
        body = {**(extra or {}), **openai_error(status, message, param)}
    else:
        body = {**(extra or {}), "error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(request: Request, exc: KolorsAPIError) -> JSONResponse:
    return error_json(request, exc.status, exc.message, extra=exc.extra, headers=exc.headers)


def unexpected(svc: Service, request: Request, exc: Exception) -> JSONResponse:
    """An exception no handler answered: 503 when the store is out (logged once per outage), else 500."""
    if is_outage(exc):
        svc.outage_seen(exc)
        return error_response(request, store_unavailable())
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_json(request, 500, "internal error")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names absolute URLs may be built from, or None when any will do (PUBLIC_URL set, or `*`)."""
    if settings.public_url:
        return None
    extra = {h.strip().lower().strip("[]") for h in settings.allowed_hosts.split(",") if h.strip()}
    if "*" in extra:
        return None
    return frozenset({settings.host.lower().strip("[]"), "localhost", "127.0.0.1", "::1"} | extra)


def host_name(header: str) -> str:
    """The name in a Host header, without the port (`[::1]:8000` → `::1`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, port = header.rpartition(":")
    return name if name and port.isascii() and port.isdigit() else header


#: A value that looks like a signature (the signer's 64 hex digits, or any long hex or base64 run).
_SECRETISH = re.compile(r"[0-9a-fA-F]{32,}|[A-Za-z0-9_\-+/]{40,}")


def redact_query(path: str) -> str:
    """`path?query` fit for the access log: without its `sig` parameters, told by the decoded name as
    the server reads it (`%73ig=`, `si%67=` and `sig=` alike), and without any parameter whose value
    looks like a signature whatever its name (`SIG=`, `;sig=`, `sig[]=`, `sig%00=`, `+sig=`: a
    working signature is 64 hex digits); the other parameters stay as they were sent."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    # Starlette reads the query with parse_qsl: '&'-separated, names percent- and '+'-decoded
    kept = [part for part in re.split("[&;]", query)
            if part and unquote_plus(part.partition("=")[0]).strip().lower() != "sig"
            and not _SECRETISH.search(unquote_plus(part))]
    rest = "&".join(kept)
    return f"{base}?{rest}" if rest else base


class RedactSignatures(logging.Filter):
    """uvicorn's access log line without the `sig` of signed output URLs (they work as bearer tokens)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def _redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSignatures) for f in access.filters):
        access.addFilter(RedactSignatures())


class Observe:
    """Every HTTP request: the Host check, the security headers, the requests counter, and the
    500/503 of an exception no handler answered (pure ASGI: no per-request task or body copy, and
    on the way of every request, so it works on the raw headers)."""

    def __init__(self, app: ASGIApp, svc: Service, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.svc = svc
        self.hosts = hosts
        #: The requests counter's children by (method, route, status): `labels()` costs a lock and more.
        self._counters: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                # as MutableHeaders.setdefault: added where the answer has no header of that name
                headers = message["headers"] = list(message.get("headers", ()))
                present = {header for header, _ in headers}
                extra = scope.get("state", {}).get("extra_headers")
                for header, value in (_SECURITY_RAW if not extra else _raw({**SECURITY_HEADERS, **extra})):
                    if header not in present:
                        headers.append((header, value))
                        present.add(header)
            await send(message)

        name = host_name((host_header(scope) or b"").decode("latin-1"))
        try:
            if self.hosts is not None and name and name not in self.hosts and scope["path"] not in PROBES:
                # Absolute URLs (status_url, output URLs) are never built from a Host we do not know
                # (none at all, HTTP/1.0: Starlette uses the bound address, which is ours).
                await error_response(Request(scope), BadRequest(
                    f"Host: {clip(name)} is not an allowed host; set KOLORS_API_PUBLIC_URL or "
                    "KOLORS_API_ALLOWED_HOSTS"))(scope, receive, observed)
            else:
                try:
                    await self.app(scope, receive, observed)
                except Exception as exc:
                    if started:
                        raise  # the answer is on its way: nothing else can be said
                    await unexpected(self.svc, Request(scope), exc)(scope, receive, observed)
        finally:
            label = (scope["method"], getattr(scope.get("route"), "path", "unmatched"), status)
            counter = self._counters.get(label)
            if counter is None:
                counter = self._counters[label] = self.svc.metrics.requests.labels(label[0], label[1], str(status))
            counter.inc()


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


_SECURITY_RAW = _raw(SECURITY_HEADERS)


def create_app(settings: Settings | None = None, store: JobStore | None = None, *,
               fast_submit: bool = True) -> FastAPI:
    """Build the app; `serve` runs it with uvicorn. Tests pass their own settings and store
    (`fast_submit=False`: async submits through the FastAPI route too, as `api/fastpath.py` must answer)."""
    settings = settings or Settings()
    embedded = store is None and not settings.fleet
    store = store or make_store(settings, recover=embedded and settings.worker)
    svc = Service(settings=settings, store=store, webhook_policy=Policy(settings.webhook_allow_hosts),
                  fetch_policy=Policy(settings.fetch_allow_hosts))
    limits = RateLimits(settings)
    svc.admission.append(limits)
    svc.inflight = InFlight(limits.storage)
    hosts = allowed_hosts(settings)
    _redact_access_log()
    if settings.worker:
        # Checked now, so a bad --engine, --device or safety setting stops `serve` before it binds
        # its port; the engine itself loads in its own process (this one imports no torch).
        from kolors_api.worker.make import check_worker
        from kolors_api.worker.supervisor import Supervisor

        check_worker(settings)
        svc.engines = Supervisor(settings, store, on_done=functools.partial(_engine_job_done, svc))
    svc.metrics.jobs.watch(svc.engines)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.store.open()
        svc.signer = Signer(await svc.store.shared_secret())
        created = await svc.ensure_bootstrap_key()
        if created:
            print(f"Created an admin API key (shown only now): {created}", flush=True)  # noqa: T201
        print(f"Playground: {playground_url(settings)}"
              + (" (paste the key above there)" if created else " (paste an API key there)")
              + f"\nAPI docs: {playground_url(settings)}docs", flush=True)  # noqa: T201
        svc.expiry_task = asyncio.create_task(_expire_loop(svc))
        # every serve process delivers webhooks: the outbox is in the store, claimed with leases
        runner = WebhookRunner(svc.store, functools.partial(webhook_body, svc), policy=svc.webhook_policy,
                               delays=retry_delays(settings.webhook_retry_delays), resolve=svc.resolve,
                               outage=svc.outage_seen, **delivery_limits(settings),
                               counted=lambda outcome: svc.metrics.webhook_deliveries.labels(outcome).inc())
        svc.webhook_runner = runner
        svc.webhook_task = asyncio.create_task(runner.run())
        if svc.engines is not None:
            await svc.engines.start()
        try:
            yield
        finally:
            svc.expiry_task.cancel()
            # One grace for all, from the signal on: webhook tries in flight get it, then are dropped
            # (their leases run out, they are made again); the engines' jobs in hand finish within it
            # or go back to the queue; queued jobs stay queued.
            runner.stop()
            ending = [asyncio.wait({svc.webhook_task}, timeout=svc.shutdown_left() + 3)]
            if svc.engines is not None:
                ending.append(svc.engines.stop(svc.shutdown_left()))
            await asyncio.gather(*ending)
            svc.webhook_task.cancel()
            await asyncio.wait({svc.webhook_task}, timeout=1)
            if svc.probe_task is not None:
                svc.probe_task.cancel()
            await svc.store.close()

    # /docs is served from the package's own Swagger UI assets (offline); no ReDoc (it needs a CDN).
    app = FastAPI(title="kolors-api", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Segmind- and OpenAI-compatible text-to-image API for Kolors.")
    add_docs(app)
    add_playground(app, settings)
    app.state.service = svc

    @app.exception_handler(KolorsAPIError)
    async def _api_error(request: Request, exc: KolorsAPIError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = f"not found: {clip(request.url.path)}"
        return error_json(request, exc.status_code, detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_json(request, 400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        return unexpected(svc, request, exc)

    if fast_submit:
        app.add_middleware(SubmitFastPath, svc=svc, route=submit_route(generation_router.routes),
                           on_error=error_response)
    app.add_middleware(Observe, svc=svc, hosts=hosts)

    for router in (system_router, admin_router, openai_router, edits_router, generation_router, events_router):
        app.include_router(router)
    if settings.cors_origins:
        # Off by default; keys travel in headers, never cookies, so no credentials.
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")
                                                          if o.strip()],
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-Id",
                                           "X-Seed", "X-Inference-Time"])
    return app


def _engine_job_done(svc: Service, pid: int, done: JobDone) -> None:
    """An engine process stored a job: its durations and counters go to this process's `/metrics`."""
    svc.metrics.jobs.observe(done.seconds, done.outcome, done.stages)
    svc.metrics.jobs.report(pid, done.report)


def delivery_limits(settings: Settings) -> dict[str, Any]:
    """The webhook runner's bounds from the settings."""
    return {"concurrency": settings.webhook_concurrency, "per_destination": settings.webhook_per_destination,
            "per_key": settings.webhook_per_key, "timeout": settings.webhook_timeout_seconds,
            "grace": settings.shutdown_grace_seconds}


async def _expire_loop(svc: Service) -> None:
    interval = min(60.0, max(1.0, svc.settings.retention_seconds / 10))
    while True:
        await asyncio.sleep(interval)
        try:
            await svc.store.expire()
        except Exception as exc:
            if is_outage(exc):
                svc.outage_seen(exc)
            else:
                log.exception("expiry sweep failed")

