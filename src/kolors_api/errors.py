"""One exception tree for the server, and the one table that maps it to HTTP.

    KolorsAPIError                      500 internal
    ├── BadRequest                      400 bad parameters or body
    ├── Unauthorized                    401 missing or unknown key
    ├── Forbidden                       403 key disabled, route or model not allowed
    ├── NotFound                        404 unknown model, route or request
    ├── InsufficientCredits             406
    ├── PayloadTooLarge                 413
    ├── Conflict                        409 the store holds it already (a duplicate id or key)
    ├── JobFailed                       422 a FAILED job (body carries the status body)
    ├── IdempotencyConflict             422 an Idempotency-Key used before with another body
    ├── RateLimited                     429 with Retry-After
    ├── Unavailable                     503 no worker / queue full / store unavailable, with Retry-After
    └── SyncTimeout                     504 a sync request outlived its deadline (carries request_id)

Handlers raise; the API turns an exception into `{"error": ...}` with `STATUS[type]` (on the OpenAI
route into OpenAI's `{"error": {"message", "type", "param", "code"}}`, see `openai_error`). The outcomes
a job store reports (`kolors_api.jobs.StoreError`) become these errors through `STORE_ERRORS`; a
store that cannot be reached (`kolors_api.jobs.outage.is_outage`) is `store_unavailable()`. A message
is cut at `MAX_MESSAGE` characters, so no answer echoes a whole body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kolors_api.jobs.base import (
    AlreadyExists,
    BalanceOutOfRange,
    IdempotencyMismatch,
    InsufficientFunds,
    QueueFull,
    StoreError,
    TooManyRunning,
)

#: The longest message an error answers with (values in it are cut to ~100 characters already).
MAX_MESSAGE = 500


class KolorsAPIError(Exception):
    """Base of every error the server answers with; `message` is what the client reads."""

    status = 500

    def __init__(
        self,
        message: str = "internal error",
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "…"
        super().__init__(message)
        self.message = message
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {**self.extra, "error": self.message}


class BadRequest(KolorsAPIError):
    status = 400


class Unauthorized(KolorsAPIError):
    status = 401


class Forbidden(KolorsAPIError):
    status = 403


class NotFound(KolorsAPIError):
    status = 404


class InsufficientCredits(KolorsAPIError):
    status = 406


class PayloadTooLarge(KolorsAPIError):
    status = 413


class Conflict(KolorsAPIError):
    status = 409


class JobFailed(KolorsAPIError):
    status = 422


class IdempotencyConflict(KolorsAPIError):
    status = 422


class RateLimited(KolorsAPIError):
    status = 429


class Unavailable(KolorsAPIError):
    status = 503


class SyncTimeout(KolorsAPIError):
    status = 504


#: The one table from exception type to HTTP status (the API reads it; tests check it).
STATUS: dict[type[KolorsAPIError], int] = {
    cls: cls.status
    for cls in (
        KolorsAPIError,
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        InsufficientCredits,
        PayloadTooLarge,
        Conflict,
        JobFailed,
        IdempotencyConflict,
        RateLimited,
        Unavailable,
        SyncTimeout,
    )
}


#: The one table from a store's outcome to the error the API answers with.
STORE_ERRORS: dict[type[StoreError], Callable[[StoreError], KolorsAPIError]] = {
    InsufficientFunds: lambda exc: InsufficientCredits(str(exc)),
    TooManyRunning: lambda exc: RateLimited(str(exc), headers={"Retry-After": "1"}),
    QueueFull: lambda exc: Unavailable(str(exc), headers={"Retry-After": "5"}),
    AlreadyExists: lambda exc: Conflict(str(exc)),
    BalanceOutOfRange: lambda exc: BadRequest(str(exc)),
    IdempotencyMismatch: lambda exc: IdempotencyConflict(str(exc)),
}


def store_unavailable() -> Unavailable:
    """The answer while the job store cannot be reached (the cause goes to the log, once)."""
    return Unavailable("store unavailable: try again shortly", headers={"Retry-After": "5"})


def from_store(exc: StoreError) -> KolorsAPIError:
    """The API error for a store's outcome (500 for one the table does not name)."""
    for cls in type(exc).__mro__:
        make = STORE_ERRORS.get(cls)
        if make is not None:
            return make(exc)
    return KolorsAPIError()


#: OpenAI's error `type` and `code` by HTTP status (what its SDKs and gateways read).
OPENAI_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    406: ("insufficient_quota", "insufficient_quota"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("server_error", "job_failed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    kind, code = OPENAI_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
