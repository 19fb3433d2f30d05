"""SQLite backend of the job store: one WAL database file, images as files beside it.

All SQL runs on one dedicated thread (one connection), so the event loop never blocks on disk.
Waiters in this process are woken at once by in-process notifications; other processes that
share the file (the `keys` CLI, a second reader) see changes by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import kolors_api.jobs.sqlite_previews as previews
from kolors_api.jobs import sqlite_fair as fair_db
from kolors_api.jobs import sqlite_hooks as hooks
from kolors_api.jobs._waiters import Waiters
from kolors_api.jobs.base import (
    AlreadyExists,
    Batch,
    InsufficientFunds,
    Job,
    Lease,
    NewJob,
    ProgressAck,
    ProgressReport,
    QueueFull,
    StoreStats,
    TooManyRunning,
    as_seen,
    credits_of,
    micro,
    output_readable,
    replayed,
    webhook_json,
)
from kolors_api.jobs.blobs import BlobDir, Blobs, remove_expired, seconds_left
from kolors_api.jobs.sqlite_keys import SQLiteKeys
from kolors_api.jobs.sqlite_rows import Tx, bump, job_of, ledger_entry, take
from kolors_api.schema import decimal

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    key_id TEXT,
    cost REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    outputs INTEGER NOT NULL DEFAULT 0,
    ext TEXT NOT NULL DEFAULT '',
    seeds TEXT NOT NULL DEFAULT '[]',
    metrics TEXT NOT NULL DEFAULT '{}',
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT,
    lease_worker TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    idempotency_key TEXT,
    webhook TEXT,
    phase TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key_id, seq);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT UNIQUE NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    enabled INTEGER NOT NULL DEFAULT 1,
    credits REAL,
    rate_limit TEXT,
    max_concurrency INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_key ON ledger(key_id, seq);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, seen_until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (job_id TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
"""

POLL = 0.25


class SQLiteStore(SQLiteKeys, hooks.SQLiteHooks):
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
        self._relay: Callable[[str | None], None] | None = None

    # -- plumbing
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        conn.executescript(SCHEMA + hooks.SCHEMA + previews.SCHEMA)
        self._conn = conn
        if self._recover:
            with self._tx() as c:
                c.execute("UPDATE jobs SET state='QUEUED', lease_token=NULL, lease_worker=NULL, "
                          "lease_until=NULL, version=version+1 WHERE state='PROCESSING'")
        if "phase" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}:
            conn.execute("ALTER TABLE jobs ADD COLUMN phase TEXT NOT NULL DEFAULT ''")  # a store of before
        fair_db.migrate(conn)  # after the recovery: the keys of re-queued jobs become active
        hooks.migrate(conn)

    def _tx(self) -> Tx:
        assert self._conn is not None
        return Tx(self._conn)

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
            return await self._run(lambda: self._q1("SELECT 1") is not None)
        except sqlite3.Error:
            return False

    async def shared_secret(self) -> bytes:
        def q() -> bytes:
            path = self.path.parent / "secret.key"
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
        return await self._run(q)

    async def read_preview(self, job_id: str) -> tuple[int, bytes] | None:
        def q() -> tuple[int, bytes] | None:
            assert self._conn is not None
            return previews.read(self._conn, job_id)
        return await self._run(q)

    def _q1(self, sql: str, *args: Any) -> sqlite3.Row | None:
        assert self._conn is not None
        row: sqlite3.Row | None = self._conn.execute(sql, args).fetchone()
        return row

    def _notify(self, job_id: str | None = None, queue: bool = False) -> None:
        for what in ([job_id] if job_id is not None else []) + ([None] if queue else []):
            self.changed(what)
            if self._relay is not None:
                self._relay(what)

    # -- wake-ups across the processes of one machine (serve and its engine processes)
    def relay(self, send: Callable[[str | None], None] | None) -> None:
        self._relay = send

    def changed(self, job_id: str | None) -> None:
        if job_id is not None:
            self._waiters.notify(job_id)
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
        job = await self._run(self._submit, new, queue_cap)
        self._notify(queue=True)
        return job

    def _submit(self, new: NewJob, queue_cap: int) -> Job:
        now = time.time()
        with self._tx() as c:
            if (first := hooks.replay_of(c, new, now)) is not None:
                return replayed(first, new, self._get(first))
            if c.execute("SELECT 1 FROM jobs WHERE id=?", (new.id,)).fetchone():
                raise AlreadyExists(f"job {new.id} already exists")
            if queue_cap:
                (queued,) = c.execute("SELECT COUNT(*) FROM jobs WHERE state='QUEUED'").fetchone()
                if queued >= queue_cap:
                    raise QueueFull(f"queue is full ({queued} jobs waiting)")
            if new.key_id is not None:
                key = c.execute("SELECT credits, max_concurrency FROM keys WHERE id=?",
                                (new.key_id,)).fetchone()
                if key is not None and key["max_concurrency"] is not None:
                    (running,) = c.execute("SELECT COUNT(*) FROM jobs WHERE key_id=? AND state IN "
                                           "('QUEUED','PROCESSING')", (new.key_id,)).fetchone()
                    if running >= key["max_concurrency"]:
                        raise TooManyRunning(key["max_concurrency"])
                if key is not None and key["credits"] is not None:
                    have, need = micro(key["credits"]), micro(new.cost)
                    if have < need:
                        raise InsufficientFunds(new.cost, key["credits"])
                    c.execute("UPDATE keys SET credits=? WHERE id=?", (credits_of(have - need), new.key_id))
                # unlimited keys get the entry too (their usage), without a balance to move
                c.execute("INSERT INTO ledger(key_id, request_id, kind, amount, at) VALUES (?,?,?,?,?)",
                          (new.key_id, new.id, "reserve", -credits_of(micro(new.cost)), now))
            c.execute(
                "INSERT INTO jobs(id, model, params, state, key_id, cost, created_at, version, "
                "idempotency_key, webhook) VALUES (?,?,?,?,?,?,?,1,?,?)",
                (new.id, new.model, json.dumps(new.params), "QUEUED", new.key_id, new.cost, now,
                 new.idempotency_key, webhook_json(new)))
            fair_db.enqueue(c, new.id, new.key_id, new.params)
            hooks.remember(c, new, now)
        job = self._get(new.id)
        assert job is not None
        return job

    def _get(self, job_id: str) -> Job | None:
        row = self._q1("SELECT * FROM jobs WHERE id=?", job_id)
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= time.time()):
            return None
        return as_seen(job_of(row), row["lease_until"], time.time())

    async def get(self, job_id: str) -> Job | None:
        return await self._run(self._get, job_id)

    async def write_inputs(self, job_id: str, inputs: Mapping[str, bytes]) -> None:
        for name, data in inputs.items():
            await asyncio.to_thread(self.blobs.write_input, job_id, name, data)

    async def read_input(self, job_id: str, name: str) -> bytes | None:
        return await asyncio.to_thread(self.blobs.read_input, job_id, name)

    async def remove_inputs(self, job_id: str) -> None:
        await asyncio.to_thread(self.blobs.remove, job_id)

    async def queue_position(self, job_id: str) -> int | None:
        def q() -> int | None:
            row = self._q1("SELECT * FROM jobs WHERE id=?", job_id)
            if row is not None and row["state"] == "PROCESSING" and row["lease_until"] is not None \
                    and row["lease_until"] < time.time():
                # QUEUED again (its lease ran out): served before every queued job, by lease deadline
                ahead = self._q1("SELECT COUNT(*) FROM jobs WHERE state='PROCESSING' AND lease_until<?",
                                 row["lease_until"])
                return int(ahead[0]) if ahead is not None else 0
            if row is None or row["state"] != "QUEUED":
                return None
            assert self._conn is not None
            lapsed = self._q1("SELECT COUNT(*) FROM jobs WHERE state='PROCESSING' AND lease_until<?", time.time())
            return fair_db.position(self._conn, row) + (int(lapsed[0]) if lapsed is not None else 0)
        return await self._run(q)

    async def wait(self, job_id: str, after_version: int, timeout: float) -> Job | None:
        return await self._waiters.wait(self.get, job_id, after_version, timeout, POLL * 4)

    async def _output(self, job_id: str, index: int) -> tuple[Job, str | None] | None:
        """A readable output's job and the token naming its images (None on rows older than that)."""
        def q() -> tuple[Job | None, str | None]:
            row = self._q1("SELECT lease_token FROM jobs WHERE id=?", job_id)
            return self._get(job_id), (row["lease_token"] if row is not None else None)
        job, token = await self._run(q)
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
        def q() -> Job | None:
            with self._tx() as c:
                row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is None:
                    return None
                if row["state"] == "QUEUED":
                    self._finish_failed(c, row, "cancelled")
                elif row["state"] == "PROCESSING":
                    c.execute("UPDATE jobs SET cancel_requested=1, version=version+1 WHERE id=?", (job_id,))
            return self._get(job_id)
        job = await self._run(q)
        self._notify(job_id)
        return job

    async def history(self, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        def q() -> tuple[list[Job], str | None]:
            assert self._conn is not None
            start = decimal(cursor)
            before = 2**62 if start is None else start
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE key_id=? AND seq<? AND (expires_at IS NULL OR expires_at>?) "
                "ORDER BY seq DESC LIMIT ?", (key_id, before, time.time(), limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            now = time.time()
            return ([as_seen(job_of(r), r["lease_until"], now) for r in rows],
                    str(rows[-1]["seq"]) if more and rows else None)
        return await self._run(q)

    # -- jobs: worker side
    async def claim(self, worker_id: str, lease_seconds: float, timeout: float) -> Lease | None:
        deadline = time.monotonic() + timeout
        assert self._queue_event is not None or self._pool is None
        while True:
            if self._queue_event is not None:
                self._queue_event.clear()
            lease, failed = await self._run(self._claim, worker_id, lease_seconds)
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

    def _claim(self, worker_id: str, lease_seconds: float) -> tuple[Lease | None, list[str]]:
        now = time.time()
        failed: list[str] = []
        with self._tx() as c:
            while True:
                # a job whose lease ran out goes first (served once already), then the fair order
                row = c.execute("SELECT * FROM jobs WHERE state='PROCESSING' AND lease_until<? "
                                "ORDER BY lease_until LIMIT 1", (now,)).fetchone() or fair_db.next_job(c)
                if row is None:
                    return None, failed
                if row["state"] == "PROCESSING":
                    bump(c, "reclaims")
                if row["deliveries"] >= self.max_deliveries:
                    if row["state"] == "PROCESSING":  # back to QUEUED when its lease ran out (`as_seen`)
                        c.execute("UPDATE jobs SET version=version+1 WHERE id=?", (row["id"],))
                    reason = f"worker lost {row['deliveries']} times"
                    self._finish_failed(c, row, reason)
                    c.execute("INSERT OR REPLACE INTO dead_letters(job_id, reason, at) VALUES (?,?,?)",
                              (row["id"], reason, now))
                    bump(c, "dead_letters")
                    failed.append(row["id"])
                    continue
                return take(c, row["id"], worker_id, now, lease_seconds), failed

    async def claim_batch(self, worker_id: str, lease_seconds: float, batch: Batch) -> list[Lease]:
        def q() -> list[Lease]:
            with self._tx() as c:
                now = time.time()
                chosen = batch.choose(fair_db.candidates(c, batch.window))
                for _, params in chosen:
                    batch.add(params)
                return [take(c, job_id, worker_id, now, lease_seconds) for job_id, _ in chosen]
        leases = await self._run(q)
        for lease in leases:
            self._notify(lease.job.id)
        return leases

    def _holds(self, c: sqlite3.Connection, lease: Lease) -> sqlite3.Row | None:
        row: sqlite3.Row | None = c.execute(
            "SELECT * FROM jobs WHERE id=? AND state='PROCESSING' AND lease_token=? AND lease_until>=?",
            (lease.job.id, lease.token, time.time())).fetchone()
        return row

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        def q() -> bool:
            with self._tx() as c:
                cur = c.execute("UPDATE jobs SET lease_until=? WHERE id=? AND state='PROCESSING' "
                                "AND lease_token=? AND lease_until>=?",
                                (time.time() + lease_seconds, lease.job.id, lease.token, time.time()))
                return cur.rowcount == 1
        return await self._run(q)

    async def progress(self, lease: Lease, step: int, total_steps: int, preview: bytes | None = None) -> bool:
        return (await self.progress_many([ProgressReport(lease, step, total_steps, preview)]))[0].held

    async def progress_many(self, reports: Sequence[ProgressReport]) -> list[ProgressAck]:
        def q() -> list[ProgressAck]:
            now = time.time()
            acks: list[ProgressAck] = []
            with self._tx() as c:
                for r in reports:
                    job_id = r.lease.job.id
                    row = c.execute("UPDATE jobs SET step=?, total_steps=?, phase=?, version=version+1 WHERE id=? "
                                    "AND state='PROCESSING' AND lease_token=? AND lease_until>=? RETURNING "
                                    "cancel_requested", (r.step, r.total_steps, r.phase, job_id, r.lease.token,
                                                         now)).fetchone()
                    if row is None:
                        acks.append(ProgressAck(held=False))
                        continue
                    hooks.enqueue(c, job_id, "progress")
                    if r.preview is not None:
                        previews.write(c, job_id, r.step, r.preview)
                    acks.append(ProgressAck(held=True, cancel_requested=bool(row[0]),
                                            previews_watched=previews.watched(c, job_id, now)))
            return acks
        acks = await self._run(q)
        for r in reports:
            self._notify(r.lease.job.id)
        return acks

    async def watch_previews(self, job_id: str, seconds: float) -> None:
        def q() -> None:
            with self._tx() as c:
                previews.watch(c, job_id, time.time() + seconds)
        await self._run(q)

    async def complete(self, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                       metrics: dict[str, float]) -> bool:
        def q() -> bool | None:
            """True: COMPLETED; None: a cancel came first (FAILED, refunded); False: the lease is stale."""
            now = time.time()
            with self._tx() as c:
                row = self._holds(c, lease)
                if row is None:
                    return False
                if row["cancel_requested"]:
                    # a cancel acknowledged before this completion wins: FAILED "cancelled", refunded
                    self._finish_failed(c, row, "cancelled")
                    return None
                # the row keeps the lease token: it names this delivery's images (jobs/blobs.py)
                c.execute(
                    "UPDATE jobs SET state='COMPLETED', outputs=?, ext=?, seeds=?, metrics=?, finished_at=?, "
                    "expires_at=?, lease_until=NULL, step=total_steps, version=version+1 "
                    "WHERE id=?", (len(images), ext, json.dumps(seeds), json.dumps(metrics), now,
                                   now + self.retention, lease.job.id))
                hooks.enqueue(c, lease.job.id, "completed")
                if row["key_id"] is not None and row["cost"]:
                    ledger_entry(c, row, "capture", 0.0)
                return True

        def holds() -> bool:
            assert self._conn is not None
            return self._holds(self._conn, lease) is not None

        if not await self._run(holds):
            return False
        # Images are written off the database thread (large images or an object store must not
        # stall the API's queries), before the fenced commit; kept or dropped after it.
        await asyncio.to_thread(self.blobs.write_pending, lease.job.id, lease.token, images, ext)
        done = await self._run(q)
        await asyncio.to_thread(self.blobs.commit if done else self.blobs.discard, lease.job.id, lease.token)
        self._notify(lease.job.id)
        return done is not False

    def _finish_failed(self, c: sqlite3.Connection, row: sqlite3.Row, error: str) -> None:
        now = time.time()
        c.execute("UPDATE jobs SET state='FAILED', error=?, finished_at=?, expires_at=?, lease_token=NULL, "
                  "lease_until=NULL, version=version+1 WHERE id=?",
                  (error, now, now + self.retention, row["id"]))
        hooks.enqueue(c, row["id"], "failed")
        if row["state"] == "QUEUED":
            fair_db.left(c, row["key_id"])
        reserved = c.execute("SELECT 1 FROM ledger WHERE request_id=? AND kind='reserve'", (row["id"],))
        if row["key_id"] is not None and row["cost"] and reserved.fetchone():
            key = c.execute("SELECT credits FROM keys WHERE id=?", (row["key_id"],)).fetchone()
            if key is not None and key["credits"] is not None:
                c.execute("UPDATE keys SET credits=? WHERE id=?",
                          (credits_of(micro(key["credits"]) + micro(row["cost"])), row["key_id"]))
            ledger_entry(c, row, "refund", credits_of(micro(row["cost"])))

    async def fail(self, lease: Lease, error: str) -> bool:
        def q() -> bool:
            with self._tx() as c:
                row = self._holds(c, lease)
                if row is None:
                    return False
                self._finish_failed(c, row, error)
                return True
        ok = await self._run(q)
        self._notify(lease.job.id)
        return ok

    async def worker_alive(self, worker_id: str, ttl: float) -> None:
        def q() -> None:
            with self._tx() as c:
                c.execute("INSERT OR REPLACE INTO workers(id, seen_until) VALUES (?,?)",
                          (worker_id, time.time() + ttl))
        await self._run(q)

    async def stats(self) -> StoreStats:
        def q() -> StoreStats:
            assert self._conn is not None
            counts = dict(self._conn.execute(
                "SELECT state, COUNT(*) FROM jobs WHERE state IN ('QUEUED','PROCESSING') GROUP BY state"
            ).fetchall())
            (alive,) = self._q1("SELECT COUNT(*) FROM workers WHERE seen_until>?", time.time()) or (0,)
            ctr = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
            return StoreStats(queued=counts.get("QUEUED", 0), processing=counts.get("PROCESSING", 0),
                              workers_alive=int(alive), reclaims=ctr.get("reclaims", 0),
                              dead_letters=ctr.get("dead_letters", 0))
        return await self._run(q)

    async def expire(self) -> int:
        def q() -> list[str]:
            now = time.time()
            with self._tx() as c:
                ids = [r[0] for r in c.execute("SELECT id FROM jobs WHERE expires_at<=?", (now,))]
                c.execute("DELETE FROM jobs WHERE expires_at<=?", (now,))
                previews.sweep(c, now)
                c.execute("DELETE FROM workers WHERE seen_until<?", (now - 3600,))
                hooks.expire(c, now)
            return ids
        ids = await self._run(q)
        # off the database thread: an object store is a network away
        await asyncio.to_thread(remove_expired, self.blobs, ids, self.retention)
        return len(ids)

    # -- keys and credits
