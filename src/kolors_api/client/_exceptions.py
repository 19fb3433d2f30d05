"""The client's one exception tree.

    KolorsAPIError (alias SegmindError)   .status, .detail, .to_dict()
    ├── APIError                          the server answered non-2xx: .status (HTTP code),
    │                                     .detail (the body's "error"), .body (the JSON body)
    ├── InferenceFailed                   the job ended FAILED: .detail (the server's error),
    │                                     .status_body (the FAILED status body)
    └── InferenceTimeout                  `wait()` gave up first: .request_id, .elapsed_s
                                          (the job goes on on the server; poll it again later)

The names and attributes match the segmind SDK (`SegmindError`, `InferenceFailed`,
`InferenceTimeout`), so `except segmind.InferenceFailed as e: e.detail` moves over by changing
the import. Network failures are not wrapped: they surface as `httpx.TransportError`.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["APIError", "InferenceFailed", "InferenceTimeout", "KolorsAPIError", "SegmindError"]


class KolorsAPIError(Exception):
    """Base of every error the client raises on purpose."""

    status: int | None
    detail: str | None

    def __init__(self, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail}

    def __str__(self) -> str:
        if self.status is None:
            return str(self.detail)
        return f"{self.status}: {self.detail}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, detail={self.detail!r})"


#: The segmind SDK's name for the base class.
SegmindError = KolorsAPIError


class APIError(KolorsAPIError):
    """A non-2xx answer that is not a FAILED job: 400 bad parameters, 401 bad key, 404 unknown
    model or request, 406 no credits, 429 rate limited, 503 no worker, 504 sync deadline...

    `detail` is the server's `error` string; `body` the whole JSON body (a 504 carries the
    `request_id` of the job, which goes on and can be fetched through v2).
    """

    status: int
    body: dict[str, Any]

    def __init__(self, status: int, detail: str | None, body: dict[str, Any] | None = None) -> None:
        super().__init__(status=status, detail=detail)
        self.body = dict(body or {})

    @property
    def request_id(self) -> str | None:
        rid = self.body.get("request_id")
        return rid if isinstance(rid, str) else None

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        try:
            data = response.json()
        except ValueError:
            data = None
        body: dict[str, Any] = data if isinstance(data, dict) else {}
        error = body.get("error")
        detail = error if isinstance(error, str) else f"HTTP {response.status_code} {response.reason_phrase}"
        return cls(response.status_code, detail, body)


class InferenceFailed(KolorsAPIError):  # noqa: N818  (the segmind SDK's name)
    """The job reached FAILED: an engine error, a content-safety block or a cancellation.

    `detail` is the server's error string; `status_body` the FAILED status body.
    """

    status_body: dict[str, Any]

    def __init__(self, detail: str | None, status_body: dict[str, Any]) -> None:
        super().__init__(status=None, detail=detail)
        self.status_body = status_body

    @property
    def request_id(self) -> str | None:
        rid = self.status_body.get("request_id")
        return rid if isinstance(rid, str) else None


class InferenceTimeout(KolorsAPIError):  # noqa: N818  (the segmind SDK's name)
    """`wait()` ran past its `timeout` before the job finished. The job may still be running:
    poll `status_url` (or build an `AsyncJob` for `request_id`) to get the result later."""

    request_id: str
    elapsed_s: float

    def __init__(self, request_id: str, elapsed_s: float) -> None:
        super().__init__(status=None,
                         detail=f"request {request_id!r} did not complete within {elapsed_s:.1f}s")
        self.request_id = request_id
        self.elapsed_s = elapsed_s
