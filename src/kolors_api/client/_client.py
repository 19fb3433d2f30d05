"""The synchronous client: `Client`, its v2 job handle `AsyncJob`, and the module-level shortcuts.

The surface is the segmind SDK's, so code moves over by changing an import::

    from kolors_api import client as segmind      # was: import segmind

    result = segmind.run("kolors", prompt="a red fox in the snow", steps=25)
    print(result["output"][0], result["seeds"][0])

    with Client(base_url="http://127.0.0.1:8000") as c:
        job = c.submit_async("kolors", prompt="a lighthouse at dusk")
        result = job.wait(timeout=300)
        png, = c.images(result)

Only httpx is needed. The helpers at the bottom of this module (URLs, auth, reading answers) are
shared with the asyncio twin in `_async.py`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from kolors_api.client._events import Event, Follow
from kolors_api.client._exceptions import APIError, InferenceFailed, InferenceTimeout, KolorsAPIError
from kolors_api.client._images import with_images

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_POLL_TIMEOUT_S",
    "AsyncJob",
    "Client",
    "SegmindClient",
    "run",
    "run_sync",
    "submit_async",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_POLL_TIMEOUT_S = 600.0
#: The states a v2 job ends in; a body announcing one is a payload even under HTTP 422.
TERMINAL_STATES = ("COMPLETED", "FAILED")

#: Called with every status body `wait()` reads (QUEUED with queue_position, PROCESSING with progress).
StatusCallback = Callable[[dict[str, Any]], None]


@dataclass
class AsyncJob:
    """Handle of a submitted v2 request (the segmind SDK's `AsyncJob`); `Client.submit_async` makes one.

    Example::

        job = client.submit_async("kolors", prompt="a koi pond", steps=20)
        job.status()       # {"request_id": ..., "status": "PROCESSING", "progress": {"step": 3, ...}}
        result = job.wait(timeout=300, interval=0.5)
    """

    request_id: str
    status_url: str
    response_url: str
    submit_response: dict[str, Any]
    _client: Client = field(repr=False)

    def status(self) -> dict[str, Any]:
        """The status body, without waiting: `status` is QUEUED (with `queue_position`), PROCESSING
        (with `progress: {step, total_steps}`), COMPLETED, or FAILED (with `error`)."""
        return self._client._get_terminal_tolerant(self.status_url)

    def result(self) -> dict[str, Any]:
        """The result body: on COMPLETED `output` (image URLs), `seeds`, `metrics`, `input`; while the
        job runs, its status body; on FAILED the FAILED body (not raised, as in the segmind SDK)."""
        return self._client._get_terminal_tolerant(self.response_url)

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel: a queued job ends FAILED "cancelled" at once, a running one at
        its next step (`wait()` then raises `InferenceFailed`). Returns the status body, with
        `cancel_requested`; a finished job is left as it is."""
        return json_body(self._client._http.post(f"{self.response_url}/cancel"))

    def wait(self, timeout: float = DEFAULT_POLL_TIMEOUT_S, interval: float = DEFAULT_POLL_INTERVAL_S,
             *, on_status: StatusCallback | None = None) -> dict[str, Any]:
        """Poll until the job ends and return the result body.

        `on_status`, if given, sees every status body read (to drive a progress bar).
        Raises `InferenceFailed` on FAILED and `InferenceTimeout` after `timeout` seconds (the job
        goes on on the server).
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            body = self.status()
            if on_status is not None:
                on_status(body)
            state = body.get("status")
            if state == "COMPLETED":
                return self.result()
            if state == "FAILED":
                raise InferenceFailed(error_of(body), body)
            now = time.monotonic()
            if now >= deadline:
                raise InferenceTimeout(self.request_id, now - start)
            time.sleep(min(interval, deadline - now))


    def events(self, *, previews: bool = False) -> Iterator[Event]:
        """The job's events as they happen (server-sent events), until `completed` or `failed`.

        `previews=True`: progress events carry a small preview image (`Event.preview`) every few
        steps. A dropped stream is reopened with Last-Event-ID, so nothing that matters is missed;
        after `MAX_RECONNECTS` failed tries in a row the last error is raised (`APIError` for an
        HTTP error such as 404, an `httpx.TransportError` for a broken connection).

        Example::

            for event in job.events():
                print(event.event, event.data.get("step"))
            result = event.data          # the last one is completed (the result body) or failed
        """
        follow = Follow(self.request_id, self.response_url, previews, self._client.timeout)
        while True:
            error: Exception | None = None
            try:
                with self._client._http.stream("GET", follow.url, headers=follow.headers,
                                               timeout=follow.timeout) as response:
                    if not response.is_success:
                        response.read()
                        raise_for_status(response)
                    for line in response.iter_lines():
                        if (event := follow.feed(line)) is not None:
                            yield event
                            if event.terminal:
                                return
            except (httpx.TransportError, APIError) as exc:
                error = exc
            time.sleep(follow.retry_after(error))


class Client:
    """A connection to a kolors-api server (or anything speaking Segmind's v1/v2 wire).

    `api_key` defaults to env `KOLORS_API_KEY`; `base_url` to env `KOLORS_API_BASE_URL`, then
    `http://127.0.0.1:8000`, with or without a trailing `/v1`. `timeout` is the per-request
    read timeout in seconds (a `run_sync` call waits for the whole generation).
    The key is sent as `x-api-key`, only to the server's own origin (and the origins it hands
    out for polling), never to a foreign host an output URL may point at.

    Example::

        with Client(api_key="kol_...") as client:
            result = client.run("kolors", prompt="a cat in a spacesuit", seed=7)
            image = client.download(result["output"][0])
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 60.0,
                 *, transport: httpx.BaseTransport | None = None) -> None:
        self.api_key = api_key or os.environ.get("KOLORS_API_KEY") or None
        self.base_url = root_url(base_url)
        self.timeout = timeout
        self._auth = KeyAuth(self.api_key, self.base_url)
        self._http = httpx.Client(base_url=self.base_url, auth=self._auth, headers=default_headers(),
                                  timeout=httpx.Timeout(timeout, connect=5.0), transport=transport)

    # -- the segmind surface
    def run(self, model: str, /, **params: Any) -> dict[str, Any]:
        """Submit through v2 and wait (600 s at most): the result body of a COMPLETED job.

        Every keyword goes to the model; for another deadline use `submit_async(...).wait(timeout=...)`.
        Picture fields (`image`, `ip_adapter_image`) take a path, bytes, a PIL image, a URL or base64::

            client.run("kolors-img2img", prompt="a watercolour", image="photo.jpg", strength=0.6)
        """
        return self.submit_async(model, **params).wait()

    def run_sync(self, model: str, /, **params: Any) -> httpx.Response:
        """`POST /v1/{model}`: one blocking call. `.content` is the image when one is asked for
        (headers `X-Seed`, `X-Request-Id`); `.json()` has `images` (base64) and `seeds` when more."""
        response = self._http.post(model_path("v1", model), json=with_images(params))
        if response.status_code == 422:
            raise_failed(response)
        raise_for_status(response)
        return response

    def submit_async(self, model: str, /, **params: Any) -> AsyncJob:
        """`POST /v2/{model}`: queue the request and return its handle at once."""
        response = self._http.post(model_path("v2", model), json=with_images(params))
        body = json_body(response)
        request_id, status_url, response_url = job_links(response, body)
        self._auth.trust(status_url, response_url)
        return AsyncJob(request_id, status_url, response_url, body, self)

    # -- conveniences
    def job(self, request_id: str) -> AsyncJob:
        """A handle for a request submitted earlier (after an `InferenceTimeout`, say)."""
        base = f"{self.base_url}/v2/requests/{request_id}"
        return AsyncJob(request_id, f"{base}/status", base, {"request_id": request_id}, self)

    def download(self, url: str) -> bytes:
        """The bytes behind an output URL (signed, so no key is needed; ours is sent only to our host)."""
        response = self._http.get(url)
        raise_for_status(response)
        return response.content

    def images(self, result: dict[str, Any]) -> list[bytes]:
        """The images of a COMPLETED result body, in order."""
        return [self.download(url) for url in output_urls(result)]

    def models(self) -> list[dict[str, Any]]:
        """`GET /v1/models`: the models served, each with its parameter JSON Schema and pricing."""
        data = json_body(self._http.get("/v1/models")).get("data")
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def account(self) -> dict[str, Any]:
        """`GET /v1/account`: the caller's credits, limits and usage."""
        return json_body(self._http.get("/v1/account"))

    # -- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def _get_terminal_tolerant(self, url: str) -> dict[str, Any]:
        return terminal_tolerant(self._http.get(url))


#: The segmind SDK's name for the client.
SegmindClient = Client

_default_client: Client | None = None


def _default() -> Client:
    global _default_client
    if _default_client is None:
        _default_client = Client()
    return _default_client


def run(model: str, /, **params: Any) -> dict[str, Any]:
    """`Client().run(...)` with a client built once from env (`KOLORS_API_KEY`, `KOLORS_API_BASE_URL`).

    Example::

        from kolors_api.client import run
        result = run("kolors", prompt="a watercolor map of Lisbon")
    """
    return _default().run(model, **params)


def run_sync(model: str, /, **params: Any) -> httpx.Response:
    """`Client().run_sync(...)` with the default client (built from env)."""
    return _default().run_sync(model, **params)


def submit_async(model: str, /, **params: Any) -> AsyncJob:
    """`Client().submit_async(...)` with the default client (built from env)."""
    return _default().submit_async(model, **params)


# -- wire helpers shared with `_async.py`

def root_url(base_url: str | None) -> str:
    """The server root: `base_url`, env `KOLORS_API_BASE_URL` or the default, less a trailing `/vN`."""
    base = (base_url or os.environ.get("KOLORS_API_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
    head, sep, last = base.rpartition("/")
    if sep and re.fullmatch(r"v\d+", last) and not head.endswith(("/", ":")):
        base = head
    return base


def default_headers() -> dict[str, str]:
    from kolors_api import __version__

    return {"User-Agent": f"kolors-api-python/{__version__}"}


def model_path(version: str, model: str) -> str:
    slug = model.strip().strip("/")
    if not slug:
        raise ValueError("model: must not be empty")
    return f"/{version}/{slug}"


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


class KeyAuth(httpx.Auth):
    """Adds `x-api-key` to requests bound for a trusted origin (the base URL's, and those of the
    status/response URLs the server hands out), so an output URL on another host never sees it."""

    def __init__(self, key: str | None, base_url: str) -> None:
        self.key = key
        self._origins = {_origin(httpx.URL(base_url))}

    def trust(self, *urls: str) -> None:
        self._origins.update(_origin(httpx.URL(u)) for u in urls)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.key and _origin(request.url) in self._origins:
            request.headers["x-api-key"] = self.key
        yield request


def raise_for_status(response: httpx.Response) -> None:
    if not response.is_success:
        raise APIError.from_response(response)


def _parsed(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or `APIError`."""
    raise_for_status(response)
    body = _parsed(response)
    if not isinstance(body, dict):
        raise KolorsAPIError(response.status_code, f"expected a JSON object from {response.request.url}")
    return body


def terminal_tolerant(response: httpx.Response) -> dict[str, Any]:
    """A status/result answer: a body announcing COMPLETED or FAILED is a payload whatever the HTTP
    code (FAILED comes with 422); any other non-2xx is `APIError`."""
    body = _parsed(response)
    if isinstance(body, dict) and body.get("status") in TERMINAL_STATES:
        return body
    return json_body(response)


def raise_failed(response: httpx.Response) -> None:
    """A v1 answer that is a FAILED job (422 with a FAILED body) is `InferenceFailed`."""
    body = _parsed(response)
    if isinstance(body, dict) and body.get("status") == "FAILED":
        raise InferenceFailed(error_of(body), body)


def error_of(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    return error if isinstance(error, str) else None


def job_links(response: httpx.Response, body: dict[str, Any]) -> tuple[str, str, str]:
    """request_id, status_url, response_url of a v2 submit answer (all three, or an error)."""
    rid, status_url, response_url = (body.get(k) for k in ("request_id", "status_url", "response_url"))
    if isinstance(rid, str) and isinstance(status_url, str) and isinstance(response_url, str) \
            and rid and status_url and response_url:
        return rid, status_url, response_url
    raise KolorsAPIError(response.status_code, "v2 submit answered without request_id / status_url / "
                                               f"response_url; got keys {sorted(body)}")


def output_urls(result: dict[str, Any]) -> list[str]:
    output = result.get("output")
    if isinstance(output, str):
        return [output]
    if not isinstance(output, list):
        raise ValueError(f"result has no output URLs (status {result.get('status')!r})")
    return [u for u in output if isinstance(u, str)]
