"""Per-key request rate limits on the generation routes (v1 sync, v2 submit, OpenAI images).

A key's `rate_limit` (``"10/min"``, also ``/s`` and ``/hour``; None = no limit) is enforced with a
moving window from the `limits` library, counted per key id:

- embedded (SQLite store): in process memory, so the limit holds for the one `serve` process;
- fleet (``redis://`` store): in the same Redis, under ``kolors:ratelimit:``, so the limit holds
  across every API replica (each hit is one atomic Lua call). The window's entries carry the
  clock of the API process that made them: keep the replicas' clocks in sync (NTP).

It runs as an admission check of `Service.submit`, after validation and before the store's
submit: a refused request reserves no credits and stores nothing (an accepted hit counts even if
the store then refuses the job, e.g. for credits). Every answer of a generation route to a limited
key carries the rate limit headers of draft-ietf-httpapi-ratelimit-headers (drafts 08 to 11, the
Structured Fields syntax), for one policy named ``"key"``::

    RateLimit-Policy: "key";q=10;w=60     quota 10 requests per 60 s window
    RateLimit: "key";r=0;t=17             0 left; a slot frees in 17 s

A refusal is 429 with those headers and ``Retry-After`` (whole seconds until a slot frees, ≥ 1).
Keys without a rate limit get no headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.requests import Request

from kolors_api.errors import Forbidden, RateLimited
from kolors_api.jobs import ApiKey
from kolors_api.jobs.redis_keys import DEFAULT_PREFIX
from kolors_api.schema import GenerateParams, decimal
from kolors_api.settings import Settings

#: The policy name in the RateLimit headers.
POLICY = "key"
#: Names of the rate limit entries in Redis (under the store's default prefix).
REDIS_PREFIX = DEFAULT_PREFIX + "ratelimit"

#: The most requests one window may allow: every hit is an entry of the moving window (in Redis,
#: one list element), so the quota bounds what one key can store; the period is one of the units.
MAX_QUOTA = 100_000
_RATE = re.compile(r"^\s*([0-9]{1,6})\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNITS = {"s": "second", "sec": "second", "second": "second", "m": "minute", "min": "minute",
          "minute": "minute", "h": "hour", "hour": "hour"}


def parse_limit(rate: str) -> RateLimitItem:
    """``"10/min"`` (the form `kolors-api keys create --rate-limit` and the admin API accept) → item."""
    match = _RATE.match(rate) if isinstance(rate, str) and len(rate) <= 40 else None
    amount = decimal(match[1], 6, lo=1, hi=MAX_QUOTA) if match is not None else None
    if match is None or amount is None:
        raise ValueError(f"rate limit: must look like \"10/min\" (1 to {MAX_QUOTA} per s, min or hour)")
    return parse(f"{amount}/{_UNITS[match[2]]}")


def storage_uri(settings: Settings) -> str:
    """The `limits` storage for the settings' store: its Redis in the fleet, process memory otherwise."""
    if not settings.fleet:
        return "async+memory://"
    if settings.store.startswith("unix://"):
        return "async+redis+" + settings.store
    return "async+" + settings.store


class RateLimits:
    """The admission check: `await limits(request, key, params)` raises RateLimited when over."""

    def __init__(self, settings: Settings) -> None:
        uri = storage_uri(settings)
        options: dict[str, Any] = {}
        if uri.startswith("async+redis"):
            # redis-py's asyncio client (the store's own dependency), not coredis.
            options = {"implementation": "redispy", "key_prefix": REDIS_PREFIX}
        storage = storage_from_string(uri, **options)
        assert isinstance(storage, Storage)  # an async+ URI gives an asyncio storage
        self.storage = storage
        self.limiter = MovingWindowRateLimiter(self.storage)
        self._items: dict[str, RateLimitItem] = {}

    def item(self, rate: str) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = parse_limit(rate)
        return item

    async def __call__(self, request: Request, key: ApiKey, params: GenerateParams) -> None:
        if key.rate_limit is None:
            return
        try:
            item = self.item(key.rate_limit)
        except ValueError:
            # Stored before the bounds existed: the key is refused until an admin sets a valid limit.
            raise Forbidden("this key's rate_limit is not valid; an admin must set a new one") from None
        allowed = await self.limiter.hit(item, key.id)
        reset_at, remaining = await self.limiter.get_window_stats(item, key.id)
        # Seconds until the oldest hit in the window leaves it, i.e. until a slot frees.
        reset = max(0, math.ceil(reset_at - time.time()))
        headers = {
            "RateLimit-Policy": f'"{POLICY}";q={item.amount};w={item.get_expiry()}',
            "RateLimit": f'"{POLICY}";r={max(0, remaining)};t={reset}',
        }
        if not allowed:
            retry = max(1, reset)
            raise RateLimited(f"rate limit exceeded: this key allows {key.rate_limit}; retry in {retry}s",
                              headers={**headers, "Retry-After": str(retry)})
        extra: dict[str, str] = getattr(request.state, "extra_headers", {})
        request.state.extra_headers = {**extra, **headers}


#: How long an Idempotency-Key's in-flight mark lives when its holder dies without clearing it.
IN_FLIGHT_SECONDS = 10
#: How often a repeat looks whether the original's answer is stored (or its mark cleared).
IN_FLIGHT_POLL_SECONDS = 0.02


class InFlight:
    """One submit at a time per (key, Idempotency-Key), in the rate limits' storage: process memory in
    embedded mode, the fleet's Redis otherwise, so it holds across replicas.

    A repeat that arrives while its original is still being admitted and stored waits until the
    original's answer is stored (then it replays that answer: no admission, so no 429) or the
    original ended without a job (then it is admitted as a new request). A holder that dies leaves
    its mark for at most `IN_FLIGHT_SECONDS`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @contextlib.asynccontextmanager
    async def claim(self, key_id: str, idempotency_key: str,
                    stored: Callable[[], Awaitable[bool]]) -> AsyncIterator[None]:
        """Hold the mark of (key_id, idempotency_key) while the body runs; return at once (holding
        nothing) when `stored()` says the original's answer is there."""
        mark = "inflight:" + hashlib.sha256(f"{key_id}\0{idempotency_key}".encode()).hexdigest()[:40]
        while await self.storage.incr(mark, IN_FLIGHT_SECONDS) != 1:
            # another request with this key is in flight: wait for its answer or its end
            deadline = time.monotonic() + IN_FLIGHT_SECONDS + 1
            while await self.storage.get(mark) > 0:
                if await stored():
                    yield
                    return
                if time.monotonic() >= deadline:
                    await self.storage.clear(mark)  # its holder died and the mark outlived its expiry
                    break
                await asyncio.sleep(IN_FLIGHT_POLL_SECONDS)
        try:
            yield
        finally:
            await self.storage.clear(mark)
