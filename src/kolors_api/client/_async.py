"""The asyncio twin of `Client`: `AsyncClient` and its job handle `AsyncioJob`, for servers that call us.

Same methods, same errors, awaited::

    async with AsyncClient() as client:
        result = await client.run("kolors", prompt="a paper boat on a river", steps=20)
        images = await client.images(result)

        job = await client.submit_async("kolors", prompt="a glass city")
        result = await job.wait(timeout=300)      # polls with asyncio.sleep
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from kolors_api.client._client import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_POLL_TIMEOUT_S,
    KeyAuth,
    default_headers,
    error_of,
    job_links,
    json_body,
    model_path,
    output_urls,
    raise_failed,
    raise_for_status,
    root_url,
    terminal_tolerant,
)
from kolors_api.client._events import Event, Follow
from kolors_api.client._exceptions import APIError, InferenceFailed, InferenceTimeout
from kolors_api.client._images import with_images

__all__ = ["AsyncClient", "AsyncioJob"]

#: Called (or awaited, if it returns an awaitable) with every status body `wait()` reads.
AsyncStatusCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass
class AsyncioJob:
    """Handle of a submitted v2 request, with awaitable `status()`, `result()` and `wait()`;
    `AsyncClient.submit_async` makes one. The twin of `AsyncJob`."""

    request_id: str
    status_url: str
    response_url: str
    submit_response: dict[str, Any]
    _client: AsyncClient = field(repr=False)

    async def status(self) -> dict[str, Any]:
        """The status body: QUEUED (`queue_position`), PROCESSING (`progress`), COMPLETED,
        or FAILED (`error`)."""
        return await self._client._get_terminal_tolerant(self.status_url)

    async def result(self) -> dict[str, Any]:
        """The result body (the FAILED body is returned, not raised, as in the segmind SDK)."""
        return await self._client._get_terminal_tolerant(self.response_url)

    async def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel (a queued job ends FAILED "cancelled" at once); the status body."""
        return json_body(await self._client._http.post(f"{self.response_url}/cancel"))

    async def wait(self, timeout: float = DEFAULT_POLL_TIMEOUT_S, interval: float = DEFAULT_POLL_INTERVAL_S,
                   *, on_status: AsyncStatusCallback | None = None) -> dict[str, Any]:
        """Poll (with `asyncio.sleep`) until the job ends; the result body of a COMPLETED job.
        Raises `InferenceFailed` on FAILED, `InferenceTimeout` after `timeout` seconds."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            body = await self.status()
            if on_status is not None:
                maybe = on_status(body)
                if maybe is not None:
                    await maybe
            state = body.get("status")
            if state == "COMPLETED":
                return await self.result()
            if state == "FAILED":
                raise InferenceFailed(error_of(body), body)
            now = time.monotonic()
            if now >= deadline:
                raise InferenceTimeout(self.request_id, now - start)
            await asyncio.sleep(min(interval, deadline - now))


    async def events(self, *, previews: bool = False) -> AsyncIterator[Event]:
        """The job's events as they happen, until `completed` or `failed`: `AsyncJob.events`, awaited.

        Example::

            async for event in job.events(previews=True):
                print(event.event, event.data.get("step"), event.preview is not None)
        """
        follow = Follow(self.request_id, self.response_url, previews, self._client.timeout)
        while True:
            error: Exception | None = None
            try:
                async with self._client._http.stream("GET", follow.url, headers=follow.headers,
                                                     timeout=follow.timeout) as response:
                    if not response.is_success:
                        await response.aread()
                        raise_for_status(response)
                    async for line in response.aiter_lines():
                        if (event := follow.feed(line)) is not None:
                            yield event
                            if event.terminal:
                                return
            except (httpx.TransportError, APIError) as exc:
                error = exc
            await asyncio.sleep(follow.retry_after(error))


class AsyncClient:
    """The asyncio twin of `Client` (built on `httpx.AsyncClient`); same arguments and env.

    Example::

        async with AsyncClient(api_key="kol_...") as client:
            result = await client.run("kolors", prompt="a fox", seed=1, steps=20)
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 60.0,
                 *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.api_key = api_key or os.environ.get("KOLORS_API_KEY") or None
        self.base_url = root_url(base_url)
        self.timeout = timeout
        self._auth = KeyAuth(self.api_key, self.base_url)
        self._http = httpx.AsyncClient(base_url=self.base_url, auth=self._auth, headers=default_headers(),
                                       timeout=httpx.Timeout(timeout, connect=5.0), transport=transport)

    async def run(self, model: str, /, **params: Any) -> dict[str, Any]:
        """Submit through v2 and wait (600 s at most): the result body of a COMPLETED job."""
        job = await self.submit_async(model, **params)
        return await job.wait()

    async def run_sync(self, model: str, /, **params: Any) -> httpx.Response:
        """`POST /v1/{model}`: one call that returns when the image is made."""
        response = await self._http.post(model_path("v1", model), json=with_images(params))
        if response.status_code == 422:
            raise_failed(response)
        raise_for_status(response)
        return response

    async def submit_async(self, model: str, /, **params: Any) -> AsyncioJob:
        """`POST /v2/{model}`: queue the request and return its handle at once."""
        response = await self._http.post(model_path("v2", model), json=with_images(params))
        body = json_body(response)
        request_id, status_url, response_url = job_links(response, body)
        self._auth.trust(status_url, response_url)
        return AsyncioJob(request_id, status_url, response_url, body, self)

    def job(self, request_id: str) -> AsyncioJob:
        """A handle for a request submitted earlier."""
        base = f"{self.base_url}/v2/requests/{request_id}"
        return AsyncioJob(request_id, f"{base}/status", base, {"request_id": request_id}, self)

    async def download(self, url: str) -> bytes:
        """The bytes behind an output URL."""
        response = await self._http.get(url)
        raise_for_status(response)
        return response.content

    async def images(self, result: dict[str, Any]) -> list[bytes]:
        """The images of a COMPLETED result body, in order (fetched concurrently)."""
        return list(await asyncio.gather(*(self.download(url) for url in output_urls(result))))

    async def models(self) -> list[dict[str, Any]]:
        """`GET /v1/models`."""
        data = json_body(await self._http.get("/v1/models")).get("data")
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    async def account(self) -> dict[str, Any]:
        """`GET /v1/account`."""
        return json_body(await self._http.get("/v1/account"))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    async def _get_terminal_tolerant(self, url: str) -> dict[str, Any]:
        return terminal_tolerant(await self._http.get(url))
