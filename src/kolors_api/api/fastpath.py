"""`POST /v2/{model}` without FastAPI's routing and dependency solving: the async submit's hot path.

A submit is the one request a client fires by the thousand, and FastAPI's router and dependency
solver cost more CPU than the submit itself. `SubmitFastPath` sits inside `Observe` (so the Host
check, security headers and request counter are the same) and answers `POST /v2/{model}` with the
very functions the FastAPI route calls, in the route's order: `authenticate` (the `CallerKey`
dependency), `read_json` within `Service.body_limit` (the `JsonBody` dependency), `Service.submit`,
`submitted`; a `KolorsAPIError` is answered by the app's error handler, anything else propagates
to `Observe` as it does from the route. Every other request goes to FastAPI. The FastAPI route
stays: it documents the operation, and it answers when the app is mounted under a `root_path`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kolors_api.api.auth import authenticate
from kolors_api.api.deps import Service, read_json
from kolors_api.api.generation import submitted
from kolors_api.errors import KolorsAPIError

PREFIX = "/v2/"


class SubmitFastPath:
    """Pure ASGI: `POST /v2/{model}` answered directly (see the module), the rest passed to `app`."""

    def __init__(self, app: ASGIApp, svc: Service, route: Any,
                 on_error: Callable[[Request, KolorsAPIError], Response]) -> None:
        self.app = app
        self.svc = svc
        #: The FastAPI route it stands for: set as `scope["route"]`, as the router would (metrics label).
        self.route = route
        self.endpoint = getattr(route, "endpoint", None)
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(PREFIX)
                or scope.get("root_path") or "/" in path[len(PREFIX):] or len(path) == len(PREFIX)):
            await self.app(scope, receive, send)
            return
        model = path[len(PREFIX):]
        scope["route"], scope["endpoint"], scope["path_params"] = self.route, self.endpoint, {"model": model}
        request = Request(scope, receive)
        svc = self.svc
        try:
            key = await authenticate(svc.store, request)
            body = await read_json(request, svc.body_limit(model))
            job = await svc.submit(request, key, model, body)
            response = submitted(svc, request, job)
        except KolorsAPIError as exc:
            response = self.on_error(request, exc)
        await response(scope, receive, send)


def submit_route(routes: Any) -> Any:
    """The FastAPI route of `POST /v2/{model}` among `routes` (included routers searched too)."""
    for route in routes:
        if getattr(route, "path", None) == "/v2/{model}" and "POST" in (getattr(route, "methods", None) or ()):
            return route
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None and inner is not routes and (found := submit_route(inner.routes)) is not None:
            return found
    return None
