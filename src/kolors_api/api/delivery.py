"""The webhook delivery runner: takes due deliveries from the store's outbox and POSTs them.

Delivery promise, in plain words: each event a job's webhook asks for is delivered at least once.
The outbox entry is written with the job's change, so it survives any process; every `serve` process
(embedded, or an API replica of a fleet) runs a runner, and a runner claims a delivery for one
attempt with a lease, so a delivery whose runner died is tried again by another (or by the same
process after a restart). A receiver may therefore see a delivery twice: `webhook-id` is the same
for every try of one delivery, so it can drop repeats.

A try: POST of the job's status body (the result body once COMPLETED) as JSON, signed per Standard
Webhooks, through the SSRF guard (`ssrf.GuardedBackend`), within `timeout` seconds from the moment it
is sent (a wait for a slot does not count), redirects not followed. 2xx: delivered. 410: stopped, and
no more deliveries for that job. Anything else (another status, a timeout, a refused connection) is
tried again after the next delay of the schedule (each delay ±20 % jitter) until the schedule ends. An
address the guard refuses is not tried again.

Fair and bounded: every try is a task of its own (a slow try holds up nothing but itself), at most
`concurrency` at once in a runner (its connection pool has as many connections), at most `per_key` at
once for one API key (the store hands out no more), and at most `per_destination` at once to one
destination: the address the guard resolved and connects to, with its port, however the URLs spell it
(`0x7f000002`, `2130706434` and a name that resolves there are one destination). So a receiver that
hangs or fails holds a few slots, one key's receivers hold at most that key's share, and neither
delays the deliveries of others; the store hands out the longest due first, per destination. Outcomes
are counted in `kolors_webhook_deliveries_total{outcome}`. With nothing to claim, a runner looks again
when a try ends or the store says a delivery may be due (`wait_for_webhooks`: SQLite after `poll`
seconds; Redis when one is made, heard by pub/sub, or when the earliest one is due): no polling.

On shutdown (`stop()`), the runner claims nothing more and gives the tries in flight at most `grace`
seconds; a try cut off is not recorded: its delivery stays in the outbox and is made again when its
claim runs out (after a restart, or by another process).
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
from kolors_api.api.ssrf import PINNED, Blocked, GuardedBackend, Policy, Resolver, split_url, system_resolve
from kolors_api.jobs import Job, JobStore, WebhookAttempt, WebhookDelivery
from kolors_api.jobs.base import destination
from kolors_api.jobs.outage import is_outage
from kolors_api.jobs.revoke import key_is_live

log = logging.getLogger("kolors_api.webhooks")

#: Seconds a try may take from the moment it is sent: connect, send, and the answer's status line.
TIMEOUT = 10.0
#: Tries in flight at once in one runner, to one destination (address and port), and for one key.
CONCURRENCY = 64
PER_DESTINATION = 4
PER_KEY = CONCURRENCY // 4


def sign(secret: str, message_id: str, body: str, at: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of `body`: webhook-id, webhook-timestamp, webhook-signature."""
    moment = datetime.fromtimestamp(int(at if at is not None else time.time()), tz=UTC)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": Webhook(secret).sign(message_id, moment, body)}


class Gates:
    """At most `limit` tries at once per destination address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    async def acquire(self, address: str) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held[address] < self.limit)
            self.held[address] += 1

    async def release(self, address: str) -> None:
        async with self._changed:
            self.held[address] -= 1
            if self.held[address] <= 0:
                del self.held[address]
            self._changed.notify_all()


class WebhookRunner:
    """Delivers the store's due webhooks until stopped (`stop()`) or cancelled; `body_of(job)` is what a
    delivery sends, `outage(exc)` is told when the store cannot be reached (the API logs that once, for
    all its users), `counted(outcome)` (if given) counts each try's outcome: delivered, retry, failed or
    stopped."""

    def __init__(self, store: JobStore, body_of: Callable[[Job], dict[str, Any]], *, policy: Policy,
                 outage: Callable[[BaseException], None],
                 delays: tuple[float, ...], resolve: Resolver = system_resolve,
                 poll: float = 0.5, lease: float | None = None, concurrency: int = CONCURRENCY,
                 per_destination: int = PER_DESTINATION, per_key: int = 0, timeout: float = TIMEOUT,
                 grace: float = 30.0, counted: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.body_of = body_of
        self.delays = delays
        self.poll = poll
        self.lease = lease if lease is not None else 3 * timeout
        self.concurrency = concurrency
        self.per_destination = per_destination
        self.per_key = per_key or max(1, concurrency // 4)
        self.timeout = timeout
        self.grace = grace
        self.counted = counted
        self.backend = GuardedBackend(policy, resolve)
        self.pool = httpcore.AsyncConnectionPool(network_backend=self.backend, retries=0, max_connections=concurrency,
                                                 max_keepalive_connections=0)
        self.outage = outage
        #: Tries in flight, by destination as the store knows it (`destination(url)`), and by key id.
        self.busy: collections.Counter[str] = collections.Counter()
        self.busy_keys: collections.Counter[str] = collections.Counter()
        #: Tries in flight by the address they connect to; and which address each busy destination reached.
        self.gates = Gates(per_destination)
        self.aliases: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Claim nothing more; `run` returns once the tries in flight end, or after `grace` seconds."""
        self._stopping = True
        self._freed.set()

    def _busy(self) -> dict[str, int]:
        # a destination whose address is at its bound (under another spelling too) counts as full
        return {d: max(n, self.gates.held.get(self.aliases.get(d, ""), 0)) for d, n in self.busy.items() if n}

    async def run(self) -> None:
        try:
            while not self._stopping:
                self._freed.clear()  # before the claim: a try that ends meanwhile wakes the wait below
                room = self.concurrency - len(self._tasks)
                due: list[WebhookDelivery] = []
                if room > 0:
                    try:
                        due = await self.store.claim_webhooks(self.lease, room, per_destination=self.per_destination,
                                                              busy=self._busy(), per_key=self.per_key,
                                                              busy_keys={k: n for k, n in self.busy_keys.items() if n})
                    except Exception as exc:  # deliveries wait in the store meanwhile
                        if is_outage(exc):
                            self.outage(exc)
                        else:
                            log.exception("claiming webhook deliveries failed")
                for delivery in due:
                    self._start(delivery)
                if 0 < room and len(due) == room:
                    continue  # there may be more due right now
                # a try that ends frees a slot (perhaps of a destination at its bound): look again then;
                # else when the store says a delivery may be due
                await self._idle()
        finally:
            await self._close()

    async def _idle(self) -> None:
        waits = {asyncio.ensure_future(self._freed.wait()), asyncio.ensure_future(self._store_wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _store_wait(self) -> None:
        try:
            await self.store.wait_for_webhooks(self.poll)
        except Exception as exc:  # an outage: look again after `poll`, as before
            if not is_outage(exc):
                log.exception("waiting for webhook deliveries failed")
            await asyncio.sleep(self.poll)

    async def _close(self) -> None:
        """The tries in flight get `grace` seconds; then they are cut off (their leases run out and
        they are made again), and the connections closed."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.pool.aclose()

    def _start(self, delivery: WebhookDelivery) -> None:
        dest, key = destination(delivery.url), delivery.key_id or ""
        self.busy[dest] += 1
        self.busy_keys[key] += 1

        async def attempt() -> None:
            try:
                await self.deliver(delivery)
            except Exception:
                log.exception("webhook delivery %s failed", delivery.id)
            finally:
                self.busy[dest] -= 1
                if self.busy[dest] <= 0:
                    del self.busy[dest]
                    self.aliases.pop(dest, None)
                self.busy_keys[key] -= 1
                if self.busy_keys[key] <= 0:
                    del self.busy_keys[key]
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
        elif not await key_is_live(self.store, delivery.key_id):
            error, final = "not sent: the request's API key is disabled or deleted", True
        else:
            body = json.dumps(self.body_of(job), separators=(",", ":"))
            secret = await self.store.webhook_secret(delivery.key_id or "")
            try:
                _, host, port = split_url(delivery.url)
                async with asyncio.timeout(self.timeout):
                    ip = await self.backend.pick(host, port)
                address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
                self.aliases[destination(delivery.url)] = address
                # a slot of the address first (the claim's lease bounds the wait), then the timeout starts
                wait = max(1.0, self.lease - self.timeout - 1)
                try:
                    async with asyncio.timeout(wait):
                        await self.gates.acquire(address)
                except TimeoutError:
                    raise OSError(f"no free slot for {address} within {wait:g}s") from None
                try:
                    PINNED.set((host, port, ip))  # connect to the very address the bound counted
                    started = time.time()
                    async with asyncio.timeout(self.timeout):
                        status = await self._post(delivery, body, secret)
                finally:
                    await self.gates.release(address)
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
