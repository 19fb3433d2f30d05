"""The webhook delivery runner: takes due deliveries from the store's outbox and POSTs them.

Delivery promise, in plain words: each event a job's webhook asks for is delivered at least once.
The outbox entry is written with the job's change, so it survives any process; every `serve` process
(embedded, or an API replica of a fleet) runs a runner, and a runner claims a delivery for one
attempt with a lease, so a delivery whose runner died is tried again by another (or by the same
process after a restart). A receiver may therefore see a delivery twice: `webhook-id` is the same
for every try of one delivery, so it can drop repeats.

A try: POST of the job's status body (the result body once COMPLETED) as JSON, signed per Standard
Webhooks, through the SSRF guard (`ssrf.GuardedBackend`), within `TIMEOUT` seconds, redirects not
followed. 2xx: delivered. 410: stopped, and no more deliveries for that job. Anything else (another
status, a timeout, a refused connection) is tried again after the next delay of the schedule (each
delay ±20 % jitter) until the schedule ends. An address the guard refuses is not tried again.

Fair and bounded per destination: every try is a task of its own (a slow try holds up nothing but
itself), at most `concurrency` at once in a runner, and at most `per_destination` at once to one
destination (`destination(url)`: host and port), so a receiver that hangs or fails holds a few
slots and never delays the deliveries to others; the store hands out the longest due first, per
destination. Outcomes are counted in `kolors_webhook_deliveries_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpcore
from standardwebhooks import Webhook

from kolors_api import __version__
from kolors_api.api.ssrf import Blocked, GuardedBackend, Policy, Resolver, system_resolve
from kolors_api.jobs import Job, JobStore, WebhookAttempt, WebhookDelivery
from kolors_api.jobs.base import destination
from kolors_api.jobs.outage import is_outage

log = logging.getLogger("kolors_api.webhooks")

#: Seconds a whole try may take: connect, send, and the answer's status line.
TIMEOUT = 10.0
#: Tries in flight at once in one runner, and to one destination (host and port).
CONCURRENCY = 64
PER_DESTINATION = 4


def sign(secret: str, message_id: str, body: str, at: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of `body`: webhook-id, webhook-timestamp, webhook-signature."""
    moment = datetime.fromtimestamp(int(at if at is not None else time.time()), tz=UTC)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": Webhook(secret).sign(message_id, moment, body)}


class WebhookRunner:
    """Delivers the store's due webhooks until cancelled; `body_of(job)` is what a delivery sends,
    `outage(exc)` is told when the store cannot be reached (the API logs that once, for all its users),
    `counted(outcome)` (if given) counts each try's outcome: delivered, retry, failed or stopped."""

    def __init__(self, store: JobStore, body_of: Callable[[Job], dict[str, Any]], *, policy: Policy,
                 outage: Callable[[BaseException], None],
                 delays: tuple[float, ...], resolve: Resolver = system_resolve,
                 poll: float = 0.5, lease: float = 3 * TIMEOUT, concurrency: int = CONCURRENCY,
                 per_destination: int = PER_DESTINATION, timeout: float = TIMEOUT,
                 counted: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.body_of = body_of
        self.delays = delays
        self.poll = poll
        self.lease = lease
        self.concurrency = concurrency
        self.per_destination = per_destination
        self.timeout = timeout
        self.counted = counted
        self.pool = httpcore.AsyncConnectionPool(network_backend=GuardedBackend(policy, resolve), retries=0,
                                                 max_keepalive_connections=0)
        self.outage = outage
        #: Tries in flight, by destination.
        self.busy: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                self._freed.clear()  # before the claim: a try that ends meanwhile wakes the wait below
                room = self.concurrency - len(self._tasks)
                due: list[WebhookDelivery] = []
                if room > 0:
                    try:
                        due = await self.store.claim_webhooks(self.lease, room, per_destination=self.per_destination,
                                                              busy={d: n for d, n in self.busy.items() if n})
                    except Exception as exc:  # deliveries wait in the store meanwhile
                        if is_outage(exc):
                            self.outage(exc)
                        else:
                            log.exception("claiming webhook deliveries failed")
                for delivery in due:
                    self._start(delivery)
                if 0 < room and len(due) == room:
                    continue  # there may be more due right now
                # a try that ends frees a slot (perhaps of a destination at its bound): look again then
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self.poll)
        finally:
            for task in list(self._tasks):
                task.cancel()  # its lease runs out and the try is made again
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.pool.aclose()

    def _start(self, delivery: WebhookDelivery) -> None:
        dest = destination(delivery.url)
        self.busy[dest] += 1

        async def attempt() -> None:
            try:
                await self.deliver(delivery)
            except Exception:
                log.exception("webhook delivery %s failed", delivery.id)
            finally:
                self.busy[dest] -= 1
                if self.busy[dest] <= 0:
                    del self.busy[dest]
                self._freed.set()

        task = asyncio.create_task(attempt())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, delivery: WebhookDelivery) -> WebhookAttempt:
        """One try of `delivery`, recorded in the store."""
        started = time.time()
        status: int | None = None
        error: str | None = None
        final = False
        job = await self.store.get(delivery.job_id)
        if job is None:
            error, final = "the request expired before its webhook was delivered", True
        else:
            body = json.dumps(self.body_of(job), separators=(",", ":"))
            secret = await self.store.webhook_secret(delivery.key_id or "")
            try:
                status = await asyncio.wait_for(self._post(delivery, body, secret), self.timeout)
            except Blocked as exc:
                error, final = f"refused by the SSRF guard: {exc}", True
            except TimeoutError:
                error = f"no answer within {self.timeout:g}s"
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        latency = round(time.time() - started, 4)
        if status is not None and 200 <= status < 300:
            state = "delivered"
        elif status == 410:
            state = "stopped"
        elif final or delivery.attempt > len(self.delays):
            state = "failed"
        else:
            state = "pending"
        if status is not None and state != "delivered":
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        attempt = WebhookAttempt(delivery_id=delivery.id, event=delivery.event, attempt=delivery.attempt,
                                 at=started, status=status, latency=latency, error=error)
        next_at = 0.0
        if state == "pending":
            next_at = time.time() + self.delays[delivery.attempt - 1] * random.uniform(0.8, 1.2)  # noqa: S311
        with contextlib.suppress(Exception):  # an outage: the lease runs out and the try is made again
            await self.store.record_webhook(delivery, attempt, state, next_at)
        if self.counted is not None:
            self.counted("retry" if state == "pending" else state)
        return attempt

    async def _post(self, delivery: WebhookDelivery, body: str, secret: str) -> int:
        headers = {"content-type": "application/json", "user-agent": f"kolors-api/{__version__}",
                   "x-kolors-event": delivery.event, **sign(secret, delivery.id, body)}
        t = self.timeout
        async with self.pool.stream("POST", delivery.url, headers=list(headers.items()), content=body.encode(),
                                    extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}}) as r:
            return int(r.status)  # the answer's body is not read
