"""The Python client of kolors-api: the segmind SDK's surface, on httpx alone.

Code written for the segmind SDK moves over by changing an import::

    from kolors_api.client import run, run_sync, submit_async, InferenceFailed

    result = run("kolors", prompt="a red fox in the snow", steps=25, seed=42)
    print(result["output"], result["seeds"])           # signed image URLs, the seeds used

    response = run_sync("kolors", prompt="a red fox in the snow")
    open("fox.webp", "wb").write(response.content)

Env: `KOLORS_API_KEY` (sent as `x-api-key`) and `KOLORS_API_BASE_URL` (default
`http://127.0.0.1:8000`, with or without `/v1`). `Client` for explicit settings, `AsyncClient`
for asyncio. Errors: see `kolors_api.client._exceptions` (`APIError`, `InferenceFailed`,
`InferenceTimeout`, all `KolorsAPIError`, alias `SegmindError`). `job.events()` follows a job live
(server-sent events, `Event`), with or without previews.
"""

from kolors_api.client._async import AsyncClient, AsyncioJob
from kolors_api.client._client import (
    DEFAULT_BASE_URL,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_POLL_TIMEOUT_S,
    AsyncJob,
    Client,
    SegmindClient,
    run,
    run_sync,
    submit_async,
)
from kolors_api.client._events import Event
from kolors_api.client._exceptions import (
    APIError,
    InferenceFailed,
    InferenceTimeout,
    KolorsAPIError,
    SegmindError,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_POLL_TIMEOUT_S",
    "APIError",
    "AsyncClient",
    "AsyncJob",
    "AsyncioJob",
    "Client",
    "Event",
    "InferenceFailed",
    "InferenceTimeout",
    "KolorsAPIError",
    "SegmindClient",
    "SegmindError",
    "run",
    "run_sync",
    "submit_async",
]
