"""Redis backend of the job store: the fleet mode, shared by stateless API replicas and GPU workers.

- The queue is plain sorted sets (`redis_fair.py`): queued jobs wait in fair order across keys (one
  sorted set per key, the keys by virtual time), so a claim costs O(log n); a running job's lease is
  its member in ``leases``, scored by its deadline. `claim` is one script: a job whose lease ran out
  (a dead worker's) first, then the fair head. With nothing queued a worker blocks on ``wake``
  (BLPOP) until a submit pushes it a wake-up (one for each sleeper: ``fair`` ``idle`` counts those none
  was pushed for), or until a lease may run out (``lease_min``): no polling. A worker
  waiting for company (`wait_for_work`) hears every submit on the ``submitted`` channel instead, so
  it never takes an idle worker's wake-up (submits publish there only while such a worker marked
  ``company`` in ``fair``, renewed every minute). Blocking reads run on connections of their own, so they
  never starve the pool.
- A lease lives in the job hash (`lease_token`, `lease_until`, `deliveries`) and in ``leases``.
  Every write of a worker (progress, heartbeat, complete, fail) is a Lua script that checks
  state == PROCESSING, lease_token == the lease's token and the deadline first: a stale worker
  changes nothing. Every state change is one script, so counters, credits and the ledger move with
  it or not at all.
- A finished job (its hash, with its images) is gone to readers at its `expires_at` (retention, on the
  server's clock), and deleted by the expiry sweep (`expire`); no TTL is written per job.
- `wait` is woken by pub/sub (every change publishes the job's version on its channel while someone
  waits on it: `wait` marks the job ``watched`` for a minute; one pattern subscription per store),
  with a re-check every second as a fallback. Changes of a job nobody waits on publish nothing.
- Timestamps written by the scripts come from the Redis server's clock, the one clock of the fleet,
  which each store reads every few seconds and hands to every script (`redis_clock.py`).
- A store that finds the layout before this one (a stream of tickets) moves it over once, on `open`
  (`redis_migrate.py`).

Not for Redis Cluster: the scripts touch keys they discover at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from kolors_api.jobs import fair
from kolors_api.jobs import redis_keys as names
from kolors_api.jobs._waiters import Waiters
from kolors_api.jobs.base import (
    AlreadyExists,
    Batch,
    IdempotencyMismatch,
    InsufficientFunds,
    Job,
    JobState,
    Lease,
    NewJob,
    ProgressAck,
    ProgressReport,
    QueueFull,
    StoreStats,
    TooManyRunning,
    as_seen,
    output_readable,
    replayed,
    webhook_json,
)
from kolors_api.jobs.blobs import BlobDir, Blobs, remove_expired, seconds_left
from kolors_api.jobs.outage import Outage
from kolors_api.jobs.redis_apikeys import KeyCache, RedisApiKeys
from kolors_api.jobs.redis_clock import ServerClock
from kolors_api.jobs.redis_codec import flat_hash, job_of, lease_of, live, opt_float, str_of
from kolors_api.jobs.redis_fair import candidates
from kolors_api.jobs.redis_hooks import RedisHooks
from kolors_api.jobs.redis_keys import Keys
from kolors_api.jobs.redis_lua import SCRIPTS as _SCRIPTS
from kolors_api.jobs.redis_migrate import OLD_KEYS, count_queued, move_running
from kolors_api.jobs.redis_migrate import SCRIPT as _MIGRATE
from kolors_api.schema import decimal

log = logging.getLogger(__name__)


class RedisStore(RedisHooks, RedisApiKeys):
    """The fleet store. `blobs` (an S3 bucket, or a folder every worker and API replica shares;
    `blob_dir` is the folder's shorthand) keeps images instead of Redis (`jobs/blobs.py`)."""

    #: Fallback re-check of `wait`, and the longest single block of `claim` (a lease that runs out
    #: wakes no one: an idle worker finds it within this), in seconds.
    recheck: float = 1.0

    def __init__(self, url: str, *, retention: float = 3600.0, max_deliveries: int = 3,
                 blob_dir: Path | None = None, prefix: str = names.DEFAULT_PREFIX,
                 blobs: Blobs | None = None) -> None:
        self.url = url
        self.retention = retention
        self.max_deliveries = max_deliveries
        self.blobs: Blobs | None = blobs if blobs is not None else BlobDir(blob_dir) if blob_dir is not None else None
        self.keys = Keys(prefix)
        self._redis: Redis | None = None
        self._blocking: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self.clock = ServerClock()
        #: Key records by hash, for authentication without a round trip (`redis_apikeys.py`).
        self._key_cache = KeyCache()
        #: What `complete` stored, by lease token, and when (server clock): `finished`.
        self._finished: dict[str, tuple[int, float]] = {}
        #: Until when (monotonic) `claim` need not look for each worker unless woken (see there).
        self._quiet_until: dict[str, float] = {}
        #: The workers of this store counted in ``fair`` ``idle`` (asleep on ``wake``; see SCRIPT_CLAIM).
        self._counted: set[str] = set()
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_lock = asyncio.Lock()
        self._waiters = Waiters()
        #: Jobs this store marked watched (`wait`), and until when (monotonic) the mark surely holds.
        self._marked: dict[str, float] = {}
        #: Until when (monotonic) this store's ``company`` mark surely holds (`wait_for_work`).
        self._company = 0.0
        #: Subscriptions of the one pub/sub connection, each set once its confirmation came.
        self._subscribed: dict[str, asyncio.Event] = {}
        #: Set by every submit's publication (once `wait_for_work` subscribed), cleared by `wait_for_work`.
        self._submitted = asyncio.Event()
        self._hooks_heard = asyncio.Event()
        self._hooks_due_at = 0.0

    # -- plumbing
    async def open(self) -> None:
        if self._redis is not None:
            return
        # RESP2: a new connection costs no HELLO round trip
        self._redis = Redis.from_url(self.url, protocol=2)
        # Blocking reads get connections of their own, so they never hold the main pool's.
        self._blocking = Redis.from_url(self.url, protocol=2)
        self._scripts = {name: self._redis.register_script(src) for name, src in _SCRIPTS.items()}
        await self._migrate()
        with contextlib.suppress(RedisError, OSError):  # loaded now, not by a first call's NOSCRIPT retry
            async with self._redis.pipeline(transaction=False) as pipe:
                for src in _SCRIPTS.values():
                    pipe.script_load(src)
                await pipe.execute()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        for client in (self._blocking, self._redis):
            if client is not None:
                await client.aclose()
        self._redis = self._blocking = None

    async def _conn(self) -> Redis:
        if self._redis is None:
            await self.open()
        assert self._redis is not None
        return self._redis

    async def _call(self, script: str, *args: str | int | float | bytes, now: float | None = None) -> Any:
        """Run a script (`redis_lua.py`) at `now` (the server's clock: `redis_clock.py`; read when not given)."""
        r = await self._conn()
        now = await self.clock.now(r) if now is None else now
        return await self._scripts[script](args=[self.keys.prefix, f"{float(self.retention)!r} {now!r}", *args])

    async def now(self) -> float:
        """The server's clock (`redis_clock.py`)."""
        return await self.clock.now(await self._conn())

    async def _migrate(self) -> None:
        """Move the jobs of the layout before this one over, once (`redis_migrate.py`)."""
        assert self._redis is not None
        if await self._redis.exists(*(self.keys.prefix + name for name in OLD_KEYS)):
            queued, running = await self._redis.eval(_MIGRATE, 0, self.keys.prefix)
            log.warning("moved %d queued and %d running jobs from the stream layout to the plain queue",
                        queued, running)
        await move_running(self._redis, self.keys)
        await count_queued(self._redis, self.keys)

    async def ping(self) -> bool:
        try:
            return bool(await (await self._conn()).ping())
        except (RedisError, OSError):
            return False

    async def shared_secret(self) -> bytes:
        r = await self._conn()
        await r.set(self.keys.secret, secrets.token_bytes(32), nx=True)
        secret = await r.get(self.keys.secret)
        assert isinstance(secret, bytes)
        return secret

    # -- jobs: API side
    async def submit(self, new: NewJob, *, queue_cap: int = 0) -> Job:
        got = await self._call(names.SCRIPT_SUBMIT, new.id, int(queue_cap), new.key_id or "",
                               repr(float(new.cost)), new.model, json.dumps(new.params),
                               new.idempotency_key or "", webhook_json(new) or "", new.request_hash,
                               repr(fair.work(new.params)))
        status = str_of(got[0])
        if status == "idem_mismatch":
            raise IdempotencyMismatch()
        if status == "replay":
            return replayed(str_of(got[1]), new, live(flat_hash(got[2:]), await self.now()))
        if status == "queue_full":
            raise QueueFull(f"queue is full ({int(got[1])} jobs waiting)")
        if status == "too_many":
            raise TooManyRunning(int(got[1]))
        if status == "funds":
            raise InsufficientFunds(float(got[1]), float(got[2]))
        if status == "exists":
            raise AlreadyExists(f"job {new.id} already exists")
        return job_of(flat_hash(got[1:]))

    async def get(self, job_id: str) -> Job | None:
        r = await self._conn()
        h = await self._job_hash(r, job_id)
        now = await self.clock.now(r)  # leases and retention are judged by the server's clock
        job = live(h, now)
        if job is None or job.state != JobState.PROCESSING:
            return job
        return as_seen(job, opt_float(h.get("lease_until")), now)

    async def _job_hash(self, r: Redis, job_id: str) -> dict[str, str]:
        """The job's hash without its images (`redis_keys.JOB_FIELDS`); empty when there is no job."""
        return _fields(await r.hmget(self.keys.job(job_id), names.JOB_FIELDS))

    async def write_inputs(self, job_id: str, inputs: Mapping[str, bytes]) -> None:
        if self.blobs is not None:
            for name, data in inputs.items():
                await asyncio.to_thread(self.blobs.write_input, job_id, name, data)
        elif inputs:
            mapping: dict[str | bytes, bytes] = {name: data for name, data in inputs.items()}  # noqa: C416
            await (await self._conn()).hset(self.keys.input(job_id), mapping=mapping)  # type: ignore[arg-type]

    async def read_input(self, job_id: str, name: str) -> bytes | None:
        if self.blobs is not None:
            return await asyncio.to_thread(self.blobs.read_input, job_id, name)
        data = await (await self._conn()).hget(self.keys.input(job_id), name)
        return data if isinstance(data, bytes) else None

    async def remove_inputs(self, job_id: str) -> None:
        if self.blobs is not None:
            await asyncio.to_thread(self.blobs.remove, job_id)
        await (await self._conn()).delete(self.keys.input(job_id))

    async def queue_position(self, job_id: str) -> int | None:
        position = int(await self._call(names.SCRIPT_POSITION, job_id))
        return None if position < 0 else position

    async def wait(self, job_id: str, after_version: int, timeout: float, *, done: bool = False) -> Job | None:
        await self._listen(self.keys.events_pattern, pattern=True)
        # A job's changes are published only while it is marked watched (`SCRIPT_MARK`): the first
        # read marks it, after the subscription and before the read, so no change can slip between.
        async def get(job_id: str) -> Job | None:
            if self._marked.get(job_id, 0.0) < time.monotonic() + timeout + 1.0:
                return await self._mark(job_id, max(self.MARK_SECONDS, timeout + 2.0))
            return await self.get(job_id)

        return await self._waiters.wait(get, job_id, after_version, timeout, self.recheck, done=done)

    #: How long one mark of `wait` makes a job's changes published, at least, in seconds.
    MARK_SECONDS = 60.0

    async def _mark(self, job_id: str, seconds: float) -> Job | None:
        """Mark the job watched for `seconds` and read it (one script)."""
        sent = time.monotonic()
        now, raw = await self._call(names.SCRIPT_MARK, job_id, repr(float(seconds)))
        h = flat_hash(raw)
        job = live(h, float(now))
        if job is None:
            self._marked.pop(job_id, None)
            return None
        if len(self._marked) > 10_000:
            self._marked = {k: v for k, v in self._marked.items() if v > sent}
        self._marked[job_id] = sent + seconds - 1.0  # surely still marked until then
        return as_seen(job, opt_float(h.get("lease_until")), float(now))

    async def wait_for_work(self, timeout: float) -> None:
        # Every submit publishes on `submitted`: a worker waiting for company hears each one without
        # taking the idle workers' wake-ups (those are `wake`'s, for `claim`).
        await self._listen(self.keys.submitted, pattern=False)
        # Submits publish only while a worker marked ``company`` in ``fair`` (for a minute); a mark
        # made now may have missed a submit just before it: look again at once.
        if self._company < time.monotonic() + timeout + 1.0:
            sent = time.monotonic()
            await self._call(names.SCRIPT_COMPANY, repr(self.MARK_SECONDS))
            self._company = sent + self.MARK_SECONDS - 1.0
            self._submitted.clear()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._submitted.wait(), timeout)
        self._submitted.clear()

    def relay(self, send: Callable[[str | None, bool], None] | None) -> None:
        """Nothing to relay: every change is published to every process."""

    def changed(self, job_id: str | None, progress: bool = False) -> None:
        """Nothing to do: the publication of the change wakes this process's waiters."""

    async def _listen(self, channel: str, *, pattern: bool) -> None:
        """Subscribe this store's one pub/sub connection to `channel` (once), and return once Redis
        confirmed it: from then on no publication can be missed."""
        if channel in self._subscribed:
            await asyncio.wait_for(self._subscribed[channel].wait(), 10)
            return
        async with self._listen_lock:
            if channel not in self._subscribed:
                self._subscribed[channel] = asyncio.Event()
                if self._pubsub is None:
                    self._pubsub = (await self._conn()).pubsub()
                await (self._pubsub.psubscribe if pattern else self._pubsub.subscribe)(channel)
                if self._listener is None:
                    self._listener = asyncio.create_task(self._dispatch(self._pubsub))
        await asyncio.wait_for(self._subscribed[channel].wait(), 10)

    async def _dispatch(self, pubsub: PubSub) -> None:
        events = Outage(log, "job events subscription", meanwhile="waiters poll every second until it is back")
        while True:
            try:
                msg = await pubsub.get_message(timeout=1.0)
                events.ok()
            except (RedisError, OSError) as exc:  # the fallback re-checks cover the gap
                events.failed(exc)
                self._key_cache.listening(False)  # a change of a key may go unheard meanwhile
                self._submitted.set()  # a worker waiting for company looks again rather than miss one
                self._hooks_heard.set()  # so does a webhook runner
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            kind, channel = str_of(msg["type"]), str_of(msg["channel"])
            if kind in ("subscribe", "psubscribe") and channel in self._subscribed:
                self._subscribed[channel].set()
                if channel == self.keys.keys_changed:
                    self._key_cache.listening(True)
            elif kind == "message" and channel == self.keys.keys_changed:
                self._key_cache.changed()
            elif kind == "message" and channel == self.keys.hooks_new:
                self._hooks_heard.set()
            elif kind == "message":
                self._submitted.set()
            elif kind == "pmessage" and (job_id := self.keys.job_id_of_channel(channel)) is not None:
                self._waiters.notify(job_id, progress=str_of(msg["data"]).endswith(" progress"))

    async def read_output(self, job_id: str, index: int) -> bytes | None:
        r = await self._conn()
        *values, image = await r.hmget(self.keys.job(job_id), [*names.JOB_FIELDS, f"out:{index}"])
        raw = _fields(values)
        job = live(raw, await self.clock.now(r))
        if not output_readable(job, index):
            return None
        if "blob" not in raw:
            if "inline" not in raw:  # stored by the layout before, in a key of its own
                image = await r.get(self.keys.output(job_id, index))
            return image if isinstance(image, bytes) else None
        if self.blobs is None:
            return None
        return await asyncio.to_thread(self.blobs.read, job_id, raw["blob"], index, job.ext)

    async def output_url(self, job_id: str, index: int) -> str | None:
        r = await self._conn()
        raw = await self._job_hash(r, job_id)
        job = live(raw, await self.clock.now(r))
        if self.blobs is None or "blob" not in raw or not output_readable(job, index):
            return None
        return await asyncio.to_thread(self.blobs.presign, job_id, raw["blob"], index, job.ext, seconds_left(job))

    async def request_cancel(self, job_id: str) -> Job | None:
        now = await self.now()
        got = await self._call(names.SCRIPT_CANCEL, job_id, now=now)
        return live(flat_hash(got[1:]), now) if str_of(got[0]) == "ok" else None

    async def history(self, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        r = await self._conn()
        start = decimal(cursor)
        before = f"({start}" if start is not None else "+inf"
        page: list[tuple[Job, int]] = []
        more = False
        while not more:
            rows: Any = await r.zrevrangebyscore(self.keys.history(key_id), before, "-inf", start=0,
                                            num=limit + 1, withscores=True)
            if not rows:
                break
            async with r.pipeline(transaction=False) as pipe:
                for member, _ in rows:
                    pipe.hmget(self.keys.job(str_of(member)), names.JOB_FIELDS)
                hashes = await pipe.execute()
            now = await self.clock.now(r)  # the clock of the lease deadlines and of retention
            for (_, score), raw in zip(rows, hashes, strict=True):
                before = f"({int(score)}"
                h = _fields(raw)
                job = live(h, now)
                if job is None:
                    continue  # expired, not yet swept by expire()
                job = as_seen(job, opt_float(h.get("lease_until")), now)
                if len(page) == limit:
                    more = True
                    break
                page.append((job, int(score)))
            if len(rows) < limit + 1:
                break
        return [job for job, _ in page], (str(page[-1][1]) if more and page else None)

    # -- jobs: worker side
    async def claim(self, worker_id: str, lease_seconds: float, timeout: float) -> Lease | None:
        deadline = time.monotonic() + timeout
        lease_ms = repr(lease_seconds * 1000.0)
        timed_out = woken = False
        while True:
            # Nothing was queued when this worker last looked, and no lease runs out before `_quiet_until`: until
            # then only a wake-up (a submit pushes one for each sleeper) says there is something to take.
            quiet = self._quiet_until.get(worker_id, 0.0) - time.monotonic()
            left = deadline - time.monotonic()
            if quiet > 0 and left > 0 and not woken:
                woken = await self._wake(min(quiet, left, self.recheck))
                timed_out = not woken
                if woken:  # (the wake-up was pushed for this claimer: it is counted no more)
                    self._counted.discard(worker_id)
                if timed_out:
                    if deadline - time.monotonic() <= 0:
                        return None
                    continue
            woken = False
            token = uuid.uuid4().hex
            now = await self.now()
            will_wait = deadline - time.monotonic() > 0
            got = await self._call(names.SCRIPT_CLAIM, worker_id, token, lease_ms, self.max_deliveries,
                                   int(timed_out), int(worker_id in self._counted), int(will_wait), now=now)
            if str_of(got[0]) == "ok":
                self._quiet_until.pop(worker_id, None)
                self._counted.discard(worker_id)
                return lease_of(got[1:], token, worker_id)
            drained = str_of(got[0]) == "drained"  # the last queued job: counted asleep already (see SCRIPT_CLAIM)
            if drained or will_wait:  # counted asleep (a submit pushes it a wake-up) until ``lease_min``, got[1]
                self._counted.add(worker_id)
                self._quiet_until[worker_id] = time.monotonic() + min(self.QUIET_SECONDS, float(got[1]) - now)
            if drained:
                return lease_of(got[2:], token, worker_id)
            if deadline - time.monotonic() <= 0:
                return None

    #: The longest an idle `claim` waits on wake-ups alone, in seconds: a lease that runs out wakes no one,
    #: and ``lease_min`` bounds only the leases taken before the claim looked (exact while every worker
    #: has one lease length; a shorter lease taken later is found within this).
    QUIET_SECONDS = 5.0

    async def claim_batch(self, worker_id: str, lease_seconds: float, batch: Batch) -> list[Lease]:
        # Choose in fair order from what is queued, then claim them in one script that takes each one
        # still QUEUED (another worker may take one meanwhile).
        r = await self._conn()
        chosen = batch.choose(await candidates(r, self.keys, batch.window))
        if not chosen:
            return []
        tokens = {job_id: uuid.uuid4().hex for job_id, _ in chosen}
        got = await self._call(names.SCRIPT_CLAIM_BATCH, worker_id, repr(lease_seconds * 1000.0),
                               *(x for pair in tokens.items() for x in pair))
        leases = []
        for flat in got:
            h = flat_hash(flat)
            leases.append(lease_of(flat, tokens[h["id"]], worker_id))
            batch.add(json.loads(h["params"]))
        return leases

    async def _wake(self, wait: float) -> bool:
        """Block until a submit pushes a wake-up (taking it: True), or `wait` seconds pass (False)."""
        await self._conn()
        assert self._blocking is not None
        return await self._blocking.blpop([self.keys.wake], timeout=max(0.001, wait)) is not None

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        return bool(await self._call(names.SCRIPT_HEARTBEAT, lease.job.id, lease.token, repr(lease_seconds * 1000.0)))

    async def progress(self, lease: Lease, step: int, total_steps: int, preview: bytes | None = None) -> bool:
        return (await self.progress_many([ProgressReport(lease, step, total_steps, preview)]))[0].held

    async def progress_many(self, reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        # One script for the jobs of one engine call (each job's check and write as atomic as alone).
        args: list[str | int | bytes] = [len(reports)]
        for r in reports:
            args += [r.lease.job.id, r.lease.token, int(r.step), int(r.total_steps), r.phase,
                     r.preview if r.preview is not None else b""]
        answers = await self._call(names.SCRIPT_PROGRESS, *args)
        return [ProgressAck(held=bool(a), cancel_requested=bool(int(a) & 2), previews_watched=bool(int(a) & 4),
                            followed=bool(int(a) & 8)) for a in answers]

    async def watch_previews(self, job_id: str, seconds: float) -> None:
        await self._call(names.SCRIPT_WATCH, job_id, repr(float(seconds)))

    async def read_preview(self, job_id: str) -> tuple[int, bytes] | None:
        step, data = await (await self._conn()).hmget(self.keys.preview(job_id), ["step", "data"])
        return (int(step), data) if step is not None and isinstance(data, bytes) else None

    async def complete(self, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                       metrics: dict[str, float]) -> bool:
        blob = ""
        payload: list[bytes] = images
        if self.blobs is not None:
            r = await self._conn()
            state, token = await r.hmget(self.keys.job(lease.job.id), ["state", "lease_token"])
            if state != b"PROCESSING" or token != lease.token.encode():
                return False  # already stale: do not even write the images
            # The record keeps the token: readers find the files of this delivery before they are
            # moved into place (and if this worker dies before it moves them).
            blob, payload = lease.token, []
            await asyncio.to_thread(self.blobs.write_pending, lease.job.id, lease.token, images, ext)
        now = await self.now()
        got = int(await self._call(names.SCRIPT_COMPLETE, lease.job.id, lease.token, ext, json.dumps(seeds),
                                   json.dumps(metrics), blob, len(images), *payload, now=now))
        if got:
            if len(self._finished) > 1000:
                self._finished.clear()
            self._finished[lease.token] = (got, now)
        if self.blobs is not None:
            keep = self.blobs.commit if got == 1 else self.blobs.discard
            await asyncio.to_thread(keep, lease.job.id, lease.token)
        return got != 0

    async def finished(self, lease: Lease) -> Job | None:
        """The job as `complete` just left it (COMPLETED, or FAILED "cancelled" when a cancel came
        first), without a read; read when this store did not complete it."""
        got, at = self._finished.pop(lease.token, (0, 0.0))
        if not got:
            return await self.get(lease.job.id)
        if got == 2:
            return replace(lease.job, state=JobState.FAILED, error="cancelled", finished_at=at)
        return replace(lease.job, state=JobState.COMPLETED, finished_at=at, step=lease.job.total_steps)

    async def fail(self, lease: Lease, error: str) -> bool:
        return bool(await self._call(names.SCRIPT_FAIL, lease.job.id, lease.token, error))

    async def worker_alive(self, worker_id: str, ttl: float) -> None:
        await self._call(names.SCRIPT_WORKER_ALIVE, worker_id, repr(float(ttl)))

    async def stats(self) -> StoreStats:
        queued, processing, alive, reclaims, dead = await self._call(names.SCRIPT_STATS)
        return StoreStats(queued=int(queued), processing=int(processing), workers_alive=int(alive),
                          reclaims=int(reclaims), dead_letters=int(dead))

    async def expire(self) -> int:
        batch, total = 500, 0
        while True:
            gone = [str_of(job_id) for job_id in await self._call(names.SCRIPT_EXPIRE, batch)]
            total += len(gone)
            if gone:  # input pictures kept in Redis (none with a blob store)
                await (await self._conn()).delete(*(self.keys.input(job_id) for job_id in gone))
            if self.blobs is not None:
                await asyncio.to_thread(remove_expired, self.blobs, gone, self.retention)
            if len(gone) < batch:
                break
        return total


def _fields(values: list[Any]) -> dict[str, str]:
    """An HMGET of `redis_keys.JOB_FIELDS` as a dict (absent fields left out)."""
    return {name: str_of(v) for name, v in zip(names.JOB_FIELDS, values, strict=False) if v is not None}
