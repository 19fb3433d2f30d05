"""The job store: one interface, two backends (SQLite embedded, Redis fleet).

Delivery promise, in plain words:

- A job accepted by `submit` is durable: it ends COMPLETED or FAILED with a reason, whatever
  process dies. It is never lost.
- Delivery to workers is at-least-once: a job whose worker stops heart-beating is handed to
  another worker after its lease runs out. Completion is fenced by the lease (`Lease.token`):
  only the holder of the current lease can report progress, complete or fail it, so a job is
  completed at most once, and its credits are captured at most once.
- After `max_deliveries` deliveries without an outcome the job ends FAILED
  ("worker lost N times") and is recorded as a dead letter; its credits are refunded.
- Records and images are kept for the retention period after the job ended (COMPLETED or
  FAILED), then `get` answers None (the API's 404). Queued and running jobs never expire.

Credits are reserved atomically with the submit, captured on COMPLETED and refunded on FAILED;
every movement is a ledger entry, so a key's balance equals the sum of its ledger.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeGuard, runtime_checkable

from kolors_api.jobs.fair import KeyQueue
from kolors_api.jobs.ids import new_job_id


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


#: The allowed transitions, written once. PROCESSING → QUEUED is a reclaim after a lost lease.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PROCESSING, JobState.FAILED}),
    JobState.PROCESSING: frozenset({JobState.QUEUED, JobState.COMPLETED, JobState.FAILED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
}


def can_transition(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


@dataclass
class Job:
    """A job record as every backend returns it."""

    id: str
    model: str
    params: dict[str, Any]
    state: JobState
    created_at: float
    key_id: str | None = None
    cost: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    #: Number of stored output images (0..n) and their file extension.
    outputs: int = 0
    ext: str = ""
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    deliveries: int = 0
    cancel_requested: bool = False
    #: Bumped by every change; `wait` returns when it moves past what the caller saw.
    version: int = 0
    expires_at: float = 0.0
    #: What a PROCESSING job does now (PHASES): denoising, then decoding, encoding, storing.
    phase: str = ""

    @property
    def attempt(self) -> int:
        """Which delivery this is (1 the first): a job QUEUED again after a lost lease waits for its next."""
        return self.deliveries + 1 if self.state == JobState.QUEUED and self.deliveries else max(1, self.deliveries)


#: The phases of a PROCESSING job, in order (`Job.phase`, the status' `progress.phase`).
PHASES = ("denoising", "decoding", "encoding", "storing")


def as_seen(job: Job, lease_until: float | None, now: float) -> Job:
    """`job` as every reader sees it: one PROCESSING whose lease ran out (its worker died or hangs) is
    QUEUED again at once, whoever reads it, although no worker has reclaimed it yet (the next claim
    takes it first: `claim`)."""
    if job.state == JobState.PROCESSING and lease_until is not None and lease_until < now:
        # one change past the record's version: the claim that takes it counts two (`take`)
        return dataclasses.replace(job, state=JobState.QUEUED, step=0, total_steps=0, phase="", version=job.version + 1)
    return job


@dataclass(frozen=True)
class NewJob:
    """What the API hands to `submit`."""

    model: str
    params: dict[str, Any]
    cost: float = 0.0
    key_id: str | None = None
    id: str = field(default_factory=new_job_id)
    #: The Idempotency-Key header, and a digest of the request it came with: `submit` answers a
    #: repeat (same key id, same key, same digest, within IDEMPOTENCY_SECONDS) with the first job.
    idempotency_key: str | None = None
    request_hash: str = ""
    #: The webhook URL and the events (WEBHOOK_EVENTS) it wants.
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ("completed",)


#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_SECONDS = 24 * 3600
#: The events a webhook may ask for: claimed, a step done, COMPLETED, FAILED.
WEBHOOK_EVENTS = ("start", "progress", "completed", "failed")
#: Delivery states: pending (due at its time), delivered (2xx), failed (out of tries), stopped (410).
WEBHOOK_STATES = ("pending", "delivered", "failed", "stopped")
#: How long delivery records and attempt logs are kept after their last change.
WEBHOOK_LOG_SECONDS = 2 * 24 * 3600
#: Deliveries a claim looks past, per destination, for those of keys within their bound.
CLAIM_LOOKAHEAD = 64


def destination(url: str) -> str:
    """The destination a webhook URL is delivered to, for the per-destination bound of the delivery
    runner: its host and port as written (lower case, without user info). The Redis store's Lua
    (`redis_hooks.LUA_OUTBOX`) computes the same."""
    rest = url.split("://", 1)[1] if "://" in url else url
    for sep in "/?#":
        rest = rest.split(sep, 1)[0]
    return rest.rsplit("@", 1)[-1].lower()


def webhook_json(new: NewJob) -> str | None:
    """How both backends keep a job's webhook: `{"url", "events"}` as JSON."""
    return None if new.webhook is None else json.dumps({"url": new.webhook, "events": list(new.webhook_events)})


def replayed(job_id: str, new: NewJob, job: Job | None) -> Job:
    """What `submit` answers for a repeated Idempotency-Key: the first job, or, when it expired
    already (kept `retention`; the key 24 h), a QUEUED stand-in with its id that `get` answers None for."""
    return job if job is not None else Job(id=job_id, model=new.model, params=new.params, state=JobState.QUEUED,
                                           created_at=0.0, key_id=new.key_id, cost=new.cost)


@dataclass(frozen=True)
class WebhookDelivery:
    """One event of one job to its webhook, claimed for one attempt (`token` fences its record)."""

    id: str
    job_id: str
    key_id: str | None
    event: str
    url: str
    attempt: int
    token: str


@dataclass(frozen=True)
class WebhookAttempt:
    """One try of a delivery, as `GET /v2/requests/{id}/webhooks` lists it."""

    delivery_id: str
    event: str
    attempt: int
    at: float
    status: int | None
    latency: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class Lease:
    """A claimed job; `token` fences every write of the worker that holds it."""

    job: Job
    token: str
    worker_id: str
    delivery: int


@dataclass(frozen=True)
class ProgressReport:
    """One job's step, for `JobStore.progress_many` (`preview`: a small webp of it at this step)."""

    lease: Lease
    step: int
    total_steps: int
    preview: bytes | None = None
    phase: str = "denoising"


@dataclass(frozen=True)
class ProgressAck:
    """What the store answers a job's progress: whether the lease still holds (else nothing was
    stored), whether a cancel was requested, whether someone watches its previews, and whether
    someone follows its changes (the worker's `storing` phase waits for that: `JobRun.phase`)."""

    held: bool
    cancel_requested: bool = False
    previews_watched: bool = False
    #: Someone follows the job's changes as they come: waits on them (an event stream, a sync request)
    #: or has its webhook deliver progress. A store that cannot tell says True.
    followed: bool = True


@dataclass
class ApiKey:
    """An API key record; the key itself is never stored, only its hash and a visible prefix."""

    id: str
    name: str
    prefix: str
    key_hash: str
    admin: bool = False
    enabled: bool = True
    credits: float | None = None
    rate_limit: str | None = None
    max_concurrency: int | None = None
    created_at: float = 0.0
    #: The key's share of the workers while several keys have queued work (`kolors_api.jobs.fair`).
    weight: float = 1.0

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "prefix": self.prefix, "admin": self.admin,
            "enabled": self.enabled, "credits": self.credits, "rate_limit": self.rate_limit,
            "max_concurrency": self.max_concurrency, "weight": self.weight, "created_at": self.created_at,
        }


@dataclass(frozen=True)
class LedgerEntry:
    key_id: str
    request_id: str
    kind: str  # reserve | capture | refund | topup
    amount: float  # signed change of the balance
    at: float


@dataclass(frozen=True)
class StoreStats:
    queued: int
    processing: int
    workers_alive: int
    reclaims: int = 0
    dead_letters: int = 0


#: The largest balance (and top-up) a key may hold, in credits. Inside the stores credits move as
#: integer micro-credits (`micro`): 1e9 credits is 1e15 micro-credits, below 2^53, so they stay exact
#: also as the doubles of SQLite REAL columns and of Redis' Lua.
MAX_CREDITS = 1e9
MICRO = 1_000_000


def micro(credits: float) -> int:
    """Credits as integer micro-credits (the stores' arithmetic: exact, no `57.980000000000004`)."""
    return math.floor(credits * MICRO + 0.5)  # the rounding of the Lua scripts too


def credits_of(micros: int) -> float:
    """Integer micro-credits as credits (the nearest double; it prints as its shortest decimal)."""
    return micros / MICRO


def show(credits: float) -> str:
    """Credits for a message: rounded to micro-credits, no exponent, no trailing zeros (`57.98`, `0`)."""
    text = f"{credits_of(micro(credits)):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


KEY_PREFIX = "kol_"
#: The fields of a key that `update_key` sets as they are (credits move through the ledger).
KEY_FIELDS = ("name", "enabled", "admin", "rate_limit", "max_concurrency", "weight")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_key_record(name: str, key: str, *, admin: bool = False, credits: float | None = None,
                    rate_limit: str | None = None, max_concurrency: int | None = None,
                    weight: float = 1.0) -> ApiKey:
    return ApiKey(id=uuid.uuid4().hex[:16], name=name, prefix=key[:10], key_hash=hash_key(key),
                  admin=admin, credits=credits, rate_limit=rate_limit,
                  max_concurrency=max_concurrency, created_at=time.time(), weight=weight)


class StoreError(Exception):
    """A store refused a request, and changed nothing.

    StoreError
    ├── InsufficientFunds  the key's credits do not cover the job's cost
    ├── QueueFull          the queue holds `queue_cap` jobs already
    ├── TooManyRunning     the key has `max_concurrency` jobs queued or running
    ├── AlreadyExists      a job id, key id or key hash that is taken
    ├── BalanceOutOfRange  `add_credits` would take the balance below 0 or above MAX_CREDITS
    └── IdempotencyMismatch  an Idempotency-Key used before with another request
    """


class InsufficientFunds(StoreError):  # noqa: N818 - a store-level outcome, mapped by the API
    def __init__(self, need: float, have: float) -> None:
        super().__init__(f"insufficient credits: need {show(need)}, have {show(have)}")
        self.need = need
        self.have = have


class QueueFull(StoreError):  # noqa: N818
    pass


class TooManyRunning(StoreError):  # noqa: N818
    def __init__(self, limit: int) -> None:
        super().__init__(f"too many concurrent requests: the limit of this key is {limit}")
        self.limit = limit


class AlreadyExists(StoreError):  # noqa: N818
    pass


class BalanceOutOfRange(StoreError):  # noqa: N818
    def __init__(self, balance: float) -> None:
        super().__init__(f"add_credits: would make the balance {show(balance)}, outside 0..{MAX_CREDITS:g}")
        self.balance = balance


class IdempotencyMismatch(StoreError):  # noqa: N818
    def __init__(self) -> None:
        super().__init__("Idempotency-Key: this key was used with another request body in the last 24 h; "
                         "use a new key for a new request")


def output_readable(job: Job | None, index: int) -> TypeGuard[Job]:
    """The `read_output` guard of every backend: a COMPLETED job that has output `index`."""
    return job is not None and job.state == JobState.COMPLETED and 0 <= index < job.outputs


class Batch(Protocol):
    """What `JobStore.claim_batch` fills (`kolors_api.jobs.batching.BatchBuilder`)."""

    @property
    def window(self) -> int:
        """How many queued jobs (the first of each key in fair order) to hand to `choose`, in all."""
        ...

    def choose(self, queues: list[KeyQueue]) -> list[tuple[str, dict[str, Any]]]:
        """Of those, the (job id, params) that would join, in the order they join; changes nothing."""
        ...

    def add(self, params: Mapping[str, Any]) -> None:
        """A job joined (the store claimed it)."""
        ...


@runtime_checkable
class JobStore(Protocol):
    """The one interface the API and the worker loop are written against.

    A refusal raises a `StoreError` (InsufficientFunds, QueueFull, TooManyRunning, AlreadyExists)
    and changes nothing; other exceptions (the backend unreachable) pass through as they are."""

    retention: float

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...

    async def shared_secret(self) -> bytes:
        """A random secret made once per store and shared by every API replica (signs output URLs)."""
        ...

    # -- jobs: API side
    async def submit(self, new: NewJob, *, queue_cap: int = 0) -> Job:
        """Store and enqueue a job, reserving `new.cost` from `new.key_id` in the same atomic step.

        Checks the key's max_concurrency in the same step. Raises AlreadyExists (a taken job id),
        QueueFull, TooManyRunning or InsufficientFunds, and then nothing is stored."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""
        ...

    async def write_inputs(self, job_id: str, inputs: Mapping[str, bytes]) -> None:
        """Keep a job's input pictures (name: their sha256) where every worker reads them (the blob
        store, or the store itself), before its `submit`; they go when the job expires."""
        ...

    async def read_input(self, job_id: str, name: str) -> bytes | None:
        """An input picture of a job; None when there is none."""
        ...

    async def remove_inputs(self, job_id: str) -> None:
        """Drop a job's input pictures: its `submit` was refused (or answered with another job)."""
        ...

    async def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs the fair order serves before this one if no other job arrives (0: it
        is next); None when not queued. Jobs of a key that becomes active later may still go first."""
        ...

    async def wait(self, job_id: str, after_version: int, timeout: float, *, done: bool = False) -> Job | None:
        """Return the job as soon as its version is above `after_version` (`done`: once it is COMPLETED
        or FAILED, whatever its progress meanwhile), or when `timeout` passes."""
        ...

    async def read_output(self, job_id: str, index: int) -> bytes | None:
        """Output image `index` of a COMPLETED job; None when there is none (or it expired)."""
        ...

    async def output_url(self, job_id: str, index: int) -> str | None:
        """A presigned URL of output `index` on the object store, valid no longer than the job is kept;
        None when there is none (the job, or images that are not on an object store)."""
        ...

    async def request_cancel(self, job_id: str) -> Job | None:
        """Fail a queued job at once (refunded); flag a running one for the worker to stop."""
        ...

    async def history(self, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]: ...

    # -- jobs: worker side
    async def claim(self, worker_id: str, lease_seconds: float, timeout: float) -> Lease | None:
        """Take a job whose lease ran out, else the next queued job in fair order (`kolors_api.jobs.fair`:
        the oldest of the key with the least work served for its weight), waiting up to `timeout`."""
        ...

    async def claim_batch(self, worker_id: str, lease_seconds: float, batch: Batch) -> list[Lease]:
        """Claim the queued jobs `batch` chooses (`kolors_api.jobs.batching`: same shape, within its
        budget, in fair order across keys) of the first `batch.window` in fair order, adding each to it;
        each gets a lease of its own. May return []."""
        ...

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        """Renew the lease; False when it was lost (the worker must stop)."""
        ...

    async def progress(self, lease: Lease, step: int, total_steps: int, preview: bytes | None = None) -> bool:
        """Record the step reached; False if the lease is stale (then nothing is stored).

        `preview` (a small webp of the job at this step) replaces the job's latest preview in the
        same atomic step; it is kept until the job expires."""
        ...

    async def progress_many(self, reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        """`progress` for several jobs (the jobs of one engine call) in one round trip, each as
        atomic as `progress` alone; answers in the order of `reports`."""
        ...

    async def watch_previews(self, job_id: str, seconds: float) -> None:
        """Someone watches the job's previews for the next `seconds` (an event stream with
        previews): its progress answers say so, and the worker makes previews only then."""
        ...

    async def read_preview(self, job_id: str) -> tuple[int, bytes] | None:
        """The job's latest preview as (step, webp bytes); None when it has none."""
        ...

    async def complete(self, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                       metrics: dict[str, float]) -> bool:
        """Store outputs and mark COMPLETED (captures the credits); False if the lease is stale.

        A cancel requested before (`request_cancel` on the running job) wins, in the same atomic
        step: the job ends FAILED "cancelled", refunded, and the images are dropped (True: the
        outcome was stored)."""
        ...

    async def finished(self, lease: Lease) -> Job | None:
        """The job as `complete` of `lease` left it (COMPLETED, or FAILED "cancelled" when a cancel
        came first); a store that remembers what it stored answers without a read (Redis)."""
        ...

    async def fail(self, lease: Lease, error: str) -> bool:
        """Mark FAILED (refunds the credits); False if the lease is stale."""
        ...

    async def worker_alive(self, worker_id: str, ttl: float) -> None: ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a job may have been queued since the last call (or the last claim), else after
        `timeout` seconds: how a worker waiting for company learns of arrivals without polling."""
        ...

    def relay(self, send: Callable[[str | None, bool], None] | None) -> None:
        """Pass this process's own changes to `send` (a job id, or None for "a job was queued"; and
        whether the change was only a running job's progress), for the
        other processes of one machine on the same store (`serve` and its engine processes); a no-op
        where the store tells every process itself (Redis publishes every change)."""
        ...

    def changed(self, job_id: str | None, progress: bool = False) -> None:
        """A change made by another process (what its `relay` sent): wake what waits for that job (a
        `progress` change not what waits for its end), or (None) a worker waiting for work. Nothing is
        relayed on."""
        ...

    async def stats(self) -> StoreStats: ...

    async def expire(self) -> int:
        """Delete records and images past retention; returns how many jobs went."""
        ...

    # -- keys and credits
    async def add_key(self, key: ApiKey) -> None:
        """Store a new key; raises AlreadyExists when its id or key_hash is taken (nothing stored)."""
        ...

    async def key_by_hash(self, key_hash: str) -> ApiKey | None: ...
    async def get_key(self, key_id: str) -> ApiKey | None: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def update_key(self, key_id: str, **changes: Any) -> ApiKey | None:
        """Change the KEY_FIELDS, `credits` (set) or `add_credits`; None when there is no such key.

        `add_credits` is bounded in the same atomic step as the write: a balance that would leave
        0..MAX_CREDITS raises BalanceOutOfRange and nothing changes (a concurrent submit cannot
        slip between the check and the write)."""
        ...

    async def delete_key(self, key_id: str) -> bool: ...
    async def ledger(self, key_id: str) -> list[LedgerEntry]: ...
    async def running_count(self, key_id: str) -> int:
        """Jobs of this key that are QUEUED or PROCESSING."""
        ...

    async def idempotent_request(self, key_id: str, idempotency_key: str) -> tuple[str, str] | None:
        """(job id, request hash) of the request an Idempotency-Key of this key id stands for, within
        IDEMPOTENCY_SECONDS; None when it is new. A read ahead of `submit` (which decides, atomically)."""
        ...

    # -- webhooks: `claim`, `progress`, `complete` and `fail` (and a cancel) put the deliveries a job's
    # webhook asks for in an outbox, in the same atomic step as the change; delivery runners take them.
    async def claim_webhooks(self, lease_seconds: float, limit: int, *, per_destination: int = 0,
                             busy: Mapping[str, int] | None = None, per_key: int = 0,
                             busy_keys: Mapping[str, int] | None = None) -> list[WebhookDelivery]:
        """Take up to `limit` due deliveries for one attempt each, the longest due first; one not recorded
        within `lease_seconds` (its runner died) is due again. With `per_destination`, at most that many
        minus `busy[d]` (the caller's tries in flight) of each `destination(url)` d: a destination that
        hangs never takes the others' turn. With `per_key`, likewise at most that many minus
        `busy_keys[k]` of each API key id k ("" for none): one key's hanging destinations never take
        every slot of a runner. Costs O(destinations with due deliveries), not O(backlog)
        (Redis; SQLite reads the due rows' destinations)."""
        ...

    async def wait_for_webhooks(self, poll: float) -> None:
        """Return when a delivery may be due since the last `claim_webhooks`: after `poll` seconds, or
        (Redis, told of each new delivery) when one is made or the earliest left is due, at least `poll`."""
        ...

    async def record_webhook(self, delivery: WebhookDelivery, attempt: WebhookAttempt, state: str,
                             next_at: float = 0.0) -> bool:
        """Log the attempt; `state` pending (due again at `next_at`), delivered, failed or stopped (the
        receiver said 410: no more deliveries for this job). False when the claim is stale."""
        ...

    async def webhook_attempts(self, job_id: str) -> list[WebhookAttempt]: ...

    async def webhook_secret(self, key_id: str) -> str:
        """The key's `whsec_` signing secret, made on first use."""
        ...

    async def rotate_webhook_secret(self, key_id: str) -> str: ...

    async def current_webhook_secret(self, key_id: str) -> str | None:
        """The key's signing secret as it is now, or None when none was made yet (a read only)."""
        ...
