"""SQLite backend of the job store: one WAL database file, images as files beside it.

All SQL runs on one dedicated thread (one connection), so the event loop never blocks on disk. The
thread works in turns (`SQLiteStore._turn`): whatever waits when a turn starts runs in it, the
submits in one transaction (a group commit), and every answer of the turn goes back in one wake-up.
One way to write a method: its SQL is a function of a `sqlite_*` module that takes the connection
(`sqlite_jobs`, `sqlite_keys`, `sqlite_hooks`, `sqlite_previews`; the schema and its migrations in
`sqlite_schema`), called here through `_db`; this class adds what is not SQL (blobs, wake-ups).
Waiters in this process are woken at once by in-process notifications; other processes that
share the file (the `keys` CLI, a second reader) see changes by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kolors_api.jobs import sqlite_fair as fair_db
from kolors_api.jobs import sqlite_hooks as hooks_db
from kolors_api.jobs import sqlite_jobs as jobs_db
from kolors_api.jobs import sqlite_keys as keys_db
from kolors_api.jobs import sqlite_previews as previews
from kolors_api.jobs import sqlite_schema
from kolors_api.jobs._waiters import Waiters
from kolors_api.jobs.base import (
    ApiKey,
    Batch,
    Job,
    Lease,
    LedgerEntry,
    NewJob,
    ProgressAck,
    ProgressReport,
    StoreStats,
    WebhookAttempt,
    WebhookDelivery,
    output_readable,
)
from kolors_api.jobs.blobs import BlobDir, Blobs, remove_expired, seconds_left
from kolors_api.jobs.sqlite_rows import Tx

T = TypeVar("T")

POLL = 0.25


class SQLiteStore:
    """The embedded store. `recover=True` (the `serve` process that owns the only worker)
    re-queues jobs left PROCESSING by a process that died. Images go to `blobs` (default: files
    under `outputs/` beside the database); a COMPLETED row keeps the lease token that names them."""

    def __init__(self, path: Path, *, retention: float = 3600.0, max_deliveries: int = 3,
                 recover: bool = False, busy_timeout: float = 30.0, blobs: Blobs | None = None) -> None:
        self.path = Path(path)
        #: How long a statement waits for another process's lock before "database is locked".
        self.busy_timeout = busy_timeout
        self.blobs: Blobs = blobs if blobs is not None else BlobDir(self.path.parent / "outputs")
        self.retention = retention
        self.max_deliveries = max_deliveries
        self._recover = recover
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._waiters = Waiters()
        self._queue_event: asyncio.Event | None = None
        self._relay: Callable[[str | None, bool], None] | None = None
        #: Work waiting for the database thread's next turn (`_turn`): calls and submits, each with
        #: the future its caller awaits; whether a turn is on its way.
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._submits: list[tuple[NewJob, int, asyncio.Future[Any]]] = []
        self._waiting = threading.Lock()
        self._turn_due = False

    # -- plumbing
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the database thread, in its next turn."""
        answer: asyncio.Future[T] = await self._wait_turn(False, (fn, args))
        return await answer

    async def _wait_turn(self, submit: bool, work: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Put `work` (with a new future) in the next turn's calls (or submits) of the database
        thread; the future. The list is read under the lock: a turn takes the lists it finds and
        leaves new ones, so a list read before the lock may be one a turn has taken already."""
        if self._pool is None:
            await self.open()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._waiting:
            (self._submits if submit else self._calls).append((*work, answer))
            start, self._turn_due = not self._turn_due, True
        if start:
            self._next_turn()
        return answer

    def _next_turn(self) -> None:
        try:
            assert self._pool is not None
            self._pool.submit(self._turn)
        except (AssertionError, RuntimeError) as exc:  # closed meanwhile
            with self._waiting:
                calls, submits = self._take()
                self._turn_due = False
            waiting = [work[-1] for work in calls + submits]
            _deliver(waiting, [_Raised(exc)] * len(waiting))

    def _take(self) -> tuple[list[Any], list[Any]]:
        """The calls and submits waiting, leaving empty lists for the next turn (under `_waiting`)."""
        calls, self._calls, submits, self._submits = self._calls, [], self._submits, []
        return calls, submits

    def _turn(self) -> None:
        """On the database thread: all the work that waits, the calls one by one, the submits in one
        transaction (a group commit: `jobs_db.submit_many`); then all their answers at once on the
        loop (one wake-up, not one per call). Work that came meanwhile is the next turn, queued behind
        whatever else the thread was given."""
        with self._waiting:
            calls, submits = self._take()
        try:
            answers: list[asyncio.Future[Any]] = []
            outcomes: list[Any] = []
            for fn, args, answer in calls:
                try:
                    outcomes.append(fn(*args))
                except BaseException as exc:  # the caller's to raise, as with an executor
                    outcomes.append(_Raised(exc))
                answers.append(answer)
            if submits:
                try:
                    assert self._conn is not None
                    jobs: list[Any] = jobs_db.submit_many(self._conn, [(new, cap) for new, cap, _ in submits])
                except Exception as exc:
                    jobs = [exc] * len(submits)
                outcomes += [_Raised(job) if isinstance(job, Exception) else job for job in jobs]
                answers += [answer for _, _, answer in submits]
            _deliver(answers, outcomes)
        finally:  # whatever happened, work that came meanwhile gets its turn
            with self._waiting:
                more = self._turn_due = bool(self._calls or self._submits)
            if more:
                self._next_turn()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on the database thread: how every method runs its SQL."""
        def call() -> T:
            assert self._conn is not None
            return fn(self._conn, *args)
        return await self._run(call)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            sqlite_schema.migrate(conn)
            if self._recover:
                jobs_db.recover(conn)
            with Tx(conn):  # after the recovery: the keys of re-queued jobs become active
                fair_db.activate_queued(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolors-sqlite")
        self._queue_event = asyncio.Event()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._connect)

    async def close(self) -> None:
        if self._pool is None:
            return
        conn = self._conn
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=True)
        self._pool = None
        self._conn = None

    async def ping(self) -> bool:
        try:
            return await self._db(jobs_db.ping)
        except sqlite3.Error:
            return False

    async def shared_secret(self) -> bytes:
        return await self._run(_secret_file, self.path.parent / "secret.key")

    async def read_preview(self, job_id: str) -> tuple[int, bytes] | None:
        return await self._db(previews.read, job_id)

    def _notify(self, job_id: str | None = None, queue: bool = False, progress: bool = False) -> None:
        for what in ([job_id] if job_id is not None else []) + ([None] if queue else []):
            self.changed(what, progress)
            if self._relay is not None:
                self._relay(what, progress)

    # -- wake-ups across the processes of one machine (serve and its engine processes)
    def relay(self, send: Callable[[str | None, bool], None] | None) -> None:
        self._relay = send

    def changed(self, job_id: str | None, progress: bool = False) -> None:
        if job_id is not None:
            self._waiters.notify(job_id, progress)
        elif self._queue_event is not None:
            self._queue_event.set()

    async def wait_for_work(self, timeout: float) -> None:
        event = self._queue_event
        if event is None:
            await asyncio.sleep(timeout)
            return
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    # -- jobs: API side
    async def submit(self, new: NewJob, *, queue_cap: int = 0) -> Job:
        # Group commit: submits that arrive while the database thread is busy wait for its next turn
        # together and go in one transaction; each is answered after that COMMIT.
        answer: asyncio.Future[Job] = await self._wait_turn(True, (new, queue_cap))
        job = await answer
        self._notify(queue=True)
        return job

    async def get(self, job_id: str) -> Job | None:
        return await self._db(jobs_db.get, job_id)

    async def write_inputs(self, job_id: str, inputs: Mapping[str, bytes]) -> None:
        for name, data in inputs.items():
            await asyncio.to_thread(self.blobs.write_input, job_id, name, data)

    async def read_input(self, job_id: str, name: str) -> bytes | None:
        return await asyncio.to_thread(self.blobs.read_input, job_id, name)

    async def remove_inputs(self, job_id: str) -> None:
        await asyncio.to_thread(self.blobs.remove, job_id)

    async def queue_position(self, job_id: str) -> int | None:
        return await self._db(jobs_db.queue_position, job_id)

    async def wait(self, job_id: str, after_version: int, timeout: float, *, done: bool = False) -> Job | None:
        return await self._waiters.wait(self.get, job_id, after_version, timeout, POLL * 4, done=done)

    async def _output(self, job_id: str, index: int) -> tuple[Job, str | None] | None:
        """A readable output's job and the token naming its images (None on rows older than that)."""
        job, token = await self._db(jobs_db.output, job_id)
        return (job, token) if output_readable(job, index) else None

    async def read_output(self, job_id: str, index: int) -> bytes | None:
        found = await self._output(job_id, index)
        return None if found is None else await asyncio.to_thread(self.blobs.read, job_id, found[1], index,
                                                                  found[0].ext)

    async def output_url(self, job_id: str, index: int) -> str | None:
        found = await self._output(job_id, index)
        return None if found is None else await asyncio.to_thread(
            self.blobs.presign, job_id, found[1], index, found[0].ext, seconds_left(found[0]))

    async def request_cancel(self, job_id: str) -> Job | None:
        job = await self._db(jobs_db.request_cancel, job_id, self.retention)
        self._notify(job_id)
        return job

    async def history(self, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        return await self._db(jobs_db.history, key_id, limit, cursor)

    # -- jobs: worker side
    async def claim(self, worker_id: str, lease_seconds: float, timeout: float) -> Lease | None:
        deadline = time.monotonic() + timeout
        assert self._queue_event is not None or self._pool is None
        while True:
            if self._queue_event is not None:
                self._queue_event.clear()
            lease, failed = await self._db(jobs_db.claim, worker_id, lease_seconds, self.max_deliveries,
                                           self.retention)
            for job_id in failed:
                self._notify(job_id)
            if lease is not None:
                self._notify(lease.job.id)
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            assert self._queue_event is not None
            try:
                await asyncio.wait_for(self._queue_event.wait(), min(left, POLL * 4))
            except TimeoutError:
                pass

    async def claim_batch(self, worker_id: str, lease_seconds: float, batch: Batch) -> list[Lease]:
        leases = await self._db(jobs_db.claim_batch, worker_id, lease_seconds, batch)
        for lease in leases:
            self._notify(lease.job.id)
        return leases

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        return await self._db(jobs_db.heartbeat, lease, lease_seconds)

    async def progress(self, lease: Lease, step: int, total_steps: int, preview: bytes | None = None) -> bool:
        return (await self.progress_many([ProgressReport(lease, step, total_steps, preview)]))[0].held

    async def progress_many(self, reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        acks = await self._db(jobs_db.progress_many, reports)
        for r in reports:
            self._notify(r.lease.job.id, progress=True)  # the job runs on: no end for sync waiters
        return acks

    async def watch_previews(self, job_id: str, seconds: float) -> None:
        await self._db(previews.watch, job_id, time.time() + seconds)

    async def complete(self, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                       metrics: dict[str, float]) -> bool:
        if await self._db(jobs_db.holds, lease) is None:
            return False
        # Images are written off the database thread (large images or an object store must not
        # stall the API's queries), before the fenced commit; kept or dropped after it.
        await asyncio.to_thread(self.blobs.write_pending, lease.job.id, lease.token, images, ext)
        done = await self._db(jobs_db.complete, lease, images, ext, seeds, metrics, self.retention)
        await asyncio.to_thread(self.blobs.commit if done else self.blobs.discard, lease.job.id, lease.token)
        self._notify(lease.job.id)
        return done is not False

    async def finished(self, lease: Lease) -> Job | None:
        return await self.get(lease.job.id)

    async def fail(self, lease: Lease, error: str) -> bool:
        ok = await self._db(jobs_db.fail, lease, error, self.retention)
        self._notify(lease.job.id)
        return ok

    async def worker_alive(self, worker_id: str, ttl: float) -> None:
        await self._db(jobs_db.worker_alive, worker_id, ttl)

    async def stats(self) -> StoreStats:
        return await self._db(jobs_db.stats)

    async def expire(self) -> int:
        ids = await self._db(jobs_db.expire)
        # off the database thread: an object store is a network away
        await asyncio.to_thread(remove_expired, self.blobs, ids, self.retention)
        return len(ids)

    # -- keys and credits (sqlite_keys.py)
    async def add_key(self, key: ApiKey) -> None:
        await self._db(keys_db.add, key)

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        return await self._db(keys_db.by_hash, key_hash)

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await self._db(keys_db.by_id, key_id)

    async def list_keys(self) -> list[ApiKey]:
        return await self._db(keys_db.all_keys)

    async def update_key(self, key_id: str, **changes: Any) -> ApiKey | None:
        return await self._db(keys_db.update, key_id, changes)

    async def delete_key(self, key_id: str) -> bool:
        return await self._db(keys_db.delete, key_id)

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        return await self._db(keys_db.ledger, key_id)

    async def running_count(self, key_id: str) -> int:
        return await self._db(keys_db.running_count, key_id)

    # -- Idempotency-Keys and webhooks (sqlite_hooks.py)
    async def idempotent_request(self, key_id: str, idempotency_key: str) -> tuple[str, str] | None:
        return await self._db(hooks_db.idempotent_request, key_id, idempotency_key)

    async def claim_webhooks(self, lease_seconds: float, limit: int, *, per_destination: int = 0,
                             busy: Mapping[str, int] | None = None, per_key: int = 0,
                             busy_keys: Mapping[str, int] | None = None) -> list[WebhookDelivery]:
        return await self._db(hooks_db.claim_webhooks, lease_seconds, limit, per_destination, busy, per_key,
                              busy_keys)

    async def wait_for_webhooks(self, poll: float) -> None:
        await asyncio.sleep(poll)  # a look costs a read, no write lock, when nothing is due

    async def record_webhook(self, delivery: WebhookDelivery, attempt: WebhookAttempt, state: str,
                             next_at: float = 0.0) -> bool:
        return await self._db(hooks_db.record_webhook, delivery, attempt, state, next_at)

    async def webhook_attempts(self, job_id: str) -> list[WebhookAttempt]:
        return await self._db(hooks_db.webhook_attempts, job_id)

    async def webhook_secret(self, key_id: str) -> str:
        return await self._db(hooks_db.webhook_secret, key_id)

    async def rotate_webhook_secret(self, key_id: str) -> str:
        return await self._db(hooks_db.rotate_webhook_secret, key_id)

    async def current_webhook_secret(self, key_id: str) -> str | None:
        return await self._db(hooks_db.current_webhook_secret, key_id)


def _secret_file(path: Path) -> bytes:
    """The secret in `path`, made (32 random bytes, mode 0600) by the first process that asks."""
    if not path.exists():
        tmp = path.with_suffix(f".{uuid.uuid4().hex}")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic create-if-absent: the first writer wins
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_bytes()


class _Raised:
    """What a call on the database thread raised, for its caller to raise."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _deliver(answers: Sequence[asyncio.Future[Any]], outcomes: Sequence[Any]) -> None:
    """Hand the outcomes to their futures: one wake-up per event loop (a store may serve several)."""
    loops: dict[asyncio.AbstractEventLoop, tuple[list[asyncio.Future[Any]], list[Any]]] = {}
    for answer, outcome in zip(answers, outcomes, strict=True):
        mine = loops.setdefault(answer.get_loop(), ([], []))
        mine[0].append(answer)
        mine[1].append(outcome)
    for loop, (theirs, their_outcomes) in loops.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, theirs, their_outcomes)


def _settle(answers: Sequence[asyncio.Future[Any]], outcomes: Sequence[Any]) -> None:
    for answer, outcome in zip(answers, outcomes, strict=True):
        if answer.done():  # its caller was cancelled
            continue
        if isinstance(outcome, _Raised):
            answer.set_exception(outcome.exc)
        else:
            answer.set_result(outcome)
