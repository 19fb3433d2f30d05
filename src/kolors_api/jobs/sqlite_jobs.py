"""The SQLite store's jobs: submit, reads, claims, leases, outcomes, stats and expiry.

Each function takes the store's connection (`SQLiteStore` calls it on its database thread) and opens
its own write transaction (`Tx`) where it writes; the helpers it shares with other modules run
inside that transaction. The store's policy (retention, max deliveries) comes in as arguments.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Sequence

from kolors_api.jobs import sqlite_fair as fair_db
from kolors_api.jobs import sqlite_hooks as hooks
from kolors_api.jobs import sqlite_previews as previews
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
    replayed,
    webhook_json,
)
from kolors_api.jobs.sqlite_rows import Tx, bump, job_of, ledger_entry
from kolors_api.schema import decimal


def recover(c: sqlite3.Connection) -> None:
    """Queue again the jobs left PROCESSING by a process that died (the one worker's process starts)."""
    with Tx(c):
        c.execute("UPDATE jobs SET state='QUEUED', lease_token=NULL, lease_worker=NULL, "
                  "lease_until=NULL, version=version+1 WHERE state='PROCESSING'")


def ping(c: sqlite3.Connection) -> bool:
    return c.execute("SELECT 1").fetchone() is not None


# -- API side
def submit(c: sqlite3.Connection, new: NewJob, queue_cap: int) -> Job:
    (job,) = submit_many(c, [(new, queue_cap)])
    if isinstance(job, BaseException):
        raise job
    return job


def submit_many(c: sqlite3.Connection, submits: Sequence[tuple[NewJob, int]]) -> list[Job | Exception]:
    """Several submits in one transaction (a group commit: one BEGIN/COMMIT for all), each in a
    savepoint of its own, so one refused (queue full, credits, a bad idempotency key) changes nothing
    and the others go on; each outcome is its job as stored, or the exception that refused it. A later
    submit sees the earlier ones (a repeated Idempotency-Key is a replay). Nothing is answered before
    the COMMIT: an error there refuses them all (raised)."""
    now = time.time()
    outcomes: list[str | Exception] = []
    with Tx(c):
        for new, queue_cap in submits:
            c.execute("SAVEPOINT submit")
            try:
                outcomes.append(_insert(c, new, queue_cap, now))
            except Exception as exc:
                c.execute("ROLLBACK TO submit")
                outcomes.append(exc)
            c.execute("RELEASE submit")
    out: list[Job | Exception] = []
    for (new, _), outcome in zip(submits, outcomes, strict=True):
        if isinstance(outcome, Exception):
            out.append(outcome)
            continue
        job = get(c, outcome)
        out.append(replayed(outcome, new, job) if outcome != new.id or job is None else job)
    return out


def _insert(c: sqlite3.Connection, new: NewJob, queue_cap: int, now: float) -> str:
    """The rows of one new job inside the caller's transaction; the id of the job that answers it
    (another one's for a repeated Idempotency-Key)."""
    if (first := hooks.replay_of(c, new, now)) is not None:
        return first
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
    work, odo = fair_db.enqueue(c, new.key_id, new.params)
    c.execute(
        "INSERT INTO jobs(id, model, params, state, key_id, cost, created_at, version, "
        "idempotency_key, webhook, work, odo) VALUES (?,?,?,?,?,?,?,1,?,?,?,?)",
        (new.id, new.model, json.dumps(new.params), "QUEUED", new.key_id, new.cost, now,
         new.idempotency_key, webhook_json(new), work, odo))
    hooks.remember(c, new, now)
    return new.id


def get(c: sqlite3.Connection, job_id: str) -> Job | None:
    row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None or (row["expires_at"] is not None and row["expires_at"] <= time.time()):
        return None
    return as_seen(job_of(row), row["lease_until"], time.time())


def queue_position(c: sqlite3.Connection, job_id: str) -> int | None:
    row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is not None and row["state"] == "PROCESSING" and row["lease_until"] is not None \
            and row["lease_until"] < time.time():
        # QUEUED again (its lease ran out): served before every queued job, by lease deadline
        ahead = c.execute("SELECT COUNT(*) FROM jobs WHERE state='PROCESSING' AND lease_until<?",
                          (row["lease_until"],)).fetchone()
        return int(ahead[0]) if ahead is not None else 0
    if row is None or row["state"] != "QUEUED":
        return None
    lapsed = c.execute("SELECT COUNT(*) FROM jobs WHERE state='PROCESSING' AND lease_until<?",
                       (time.time(),)).fetchone()
    return fair_db.position(c, row) + (int(lapsed[0]) if lapsed is not None else 0)


def output(c: sqlite3.Connection, job_id: str) -> tuple[Job | None, str | None]:
    """The job and the token naming its images (None on rows older than that)."""
    row = c.execute("SELECT lease_token FROM jobs WHERE id=?", (job_id,)).fetchone()
    return get(c, job_id), (row["lease_token"] if row is not None else None)


def request_cancel(c: sqlite3.Connection, job_id: str, retention: float) -> Job | None:
    with Tx(c):
        row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        if row["state"] == "QUEUED":
            finish_failed(c, row, "cancelled", retention)
        elif row["state"] == "PROCESSING":
            c.execute("UPDATE jobs SET cancel_requested=1, version=version+1 WHERE id=?", (job_id,))
    return get(c, job_id)


def history(c: sqlite3.Connection, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
    start = decimal(cursor)
    before = 2**62 if start is None else start
    rows = c.execute(
        "SELECT * FROM jobs WHERE key_id=? AND seq<? AND (expires_at IS NULL OR expires_at>?) "
        "ORDER BY seq DESC LIMIT ?", (key_id, before, time.time(), limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    now = time.time()
    return ([as_seen(job_of(r), r["lease_until"], now) for r in rows],
            str(rows[-1]["seq"]) if more and rows else None)


# -- worker side
def claim(c: sqlite3.Connection, worker_id: str, lease_seconds: float, max_deliveries: int,
          retention: float) -> tuple[Lease | None, list[str]]:
    """One lease (or None), and the jobs failed on the way as dead letters."""
    now = time.time()
    failed: list[str] = []
    with Tx(c):
        while True:
            # a job whose lease ran out goes first (served once already), then the fair order
            row = c.execute("SELECT * FROM jobs WHERE state='PROCESSING' AND lease_until<? "
                            "ORDER BY lease_until LIMIT 1", (now,)).fetchone() or fair_db.next_job(c)
            if row is None:
                return None, failed
            if row["state"] == "PROCESSING":
                bump(c, "reclaims")
            if row["deliveries"] >= max_deliveries:
                if row["state"] == "PROCESSING":  # back to QUEUED when its lease ran out (`as_seen`)
                    c.execute("UPDATE jobs SET version=version+1 WHERE id=?", (row["id"],))
                reason = f"worker lost {row['deliveries']} times"
                finish_failed(c, row, reason, retention)
                c.execute("INSERT OR REPLACE INTO dead_letters(job_id, reason, at) VALUES (?,?,?)",
                          (row["id"], reason, now))
                bump(c, "dead_letters")
                failed.append(row["id"])
                continue
            return take(c, row["id"], worker_id, now, lease_seconds), failed


def claim_batch(c: sqlite3.Connection, worker_id: str, lease_seconds: float, batch: Batch) -> list[Lease]:
    """Lease the queued jobs `batch` chooses from the fair order's first candidates, and add them to it."""
    with Tx(c):
        now = time.time()
        chosen = batch.choose(fair_db.candidates(c, batch.window))
        for _, params in chosen:
            batch.add(params)
        return [take(c, job_id, worker_id, now, lease_seconds) for job_id, _ in chosen]


def take(c: sqlite3.Connection, job_id: str, worker_id: str, now: float, lease_seconds: float) -> Lease:
    """Lease a job (queued, or one whose lease ran out) to `worker_id`: one more delivery."""
    token = uuid.uuid4().hex
    before = c.execute("SELECT state, key_id, work FROM jobs WHERE id=?", (job_id,)).fetchone()
    # a reclaim is two changes: back to QUEUED when the lease ran out (as readers saw it), then claimed
    c.execute("UPDATE jobs SET state='PROCESSING', deliveries=deliveries+1, lease_token=?, lease_worker=?, "
              "lease_until=?, started_at=?, step=0, phase='', "
              "version=version+(CASE state WHEN 'PROCESSING' THEN 2 ELSE 1 END) WHERE id=?",
              (token, worker_id, now + lease_seconds, now, job_id))
    if before["state"] == "QUEUED":  # a reclaimed job was charged at its first claim
        fair_db.taken(c, before["key_id"], before["work"])
    hooks.enqueue(c, job_id, "start")
    job = job_of(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
    return Lease(job=job, token=token, worker_id=worker_id, delivery=job.deliveries)


def holds(c: sqlite3.Connection, lease: Lease) -> sqlite3.Row | None:
    """The job's row while `lease` holds it."""
    row: sqlite3.Row | None = c.execute(
        "SELECT * FROM jobs WHERE id=? AND state='PROCESSING' AND lease_token=? AND lease_until>=?",
        (lease.job.id, lease.token, time.time())).fetchone()
    return row


def heartbeat(c: sqlite3.Connection, lease: Lease, lease_seconds: float) -> bool:
    with Tx(c):
        cur = c.execute("UPDATE jobs SET lease_until=? WHERE id=? AND state='PROCESSING' "
                        "AND lease_token=? AND lease_until>=?",
                        (time.time() + lease_seconds, lease.job.id, lease.token, time.time()))
        return cur.rowcount == 1


def progress_many(c: sqlite3.Connection, reports: Sequence[ProgressReport]) -> list[ProgressAck]:
    now = time.time()
    acks: list[ProgressAck] = []
    with Tx(c):
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


def complete(c: sqlite3.Connection, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
             metrics: dict[str, float], retention: float) -> bool | None:
    """True: COMPLETED; None: a cancel came first (FAILED, refunded); False: the lease is stale."""
    now = time.time()
    with Tx(c):
        row = holds(c, lease)
        if row is None:
            return False
        if row["cancel_requested"]:
            # a cancel acknowledged before this completion wins: FAILED "cancelled", refunded
            finish_failed(c, row, "cancelled", retention)
            return None
        # the row keeps the lease token: it names this delivery's images (jobs/blobs.py)
        c.execute(
            "UPDATE jobs SET state='COMPLETED', outputs=?, ext=?, seeds=?, metrics=?, finished_at=?, "
            "expires_at=?, lease_until=NULL, step=total_steps, version=version+1 "
            "WHERE id=?", (len(images), ext, json.dumps(seeds), json.dumps(metrics), now,
                           now + retention, lease.job.id))
        hooks.enqueue(c, lease.job.id, "completed")
        if row["key_id"] is not None and row["cost"]:
            ledger_entry(c, row, "capture", 0.0)
        return True


def finish_failed(c: sqlite3.Connection, row: sqlite3.Row, error: str, retention: float) -> None:
    """FAILED with `error`, the reserve refunded (inside the caller's transaction)."""
    now = time.time()
    c.execute("UPDATE jobs SET state='FAILED', error=?, finished_at=?, expires_at=?, lease_token=NULL, "
              "lease_until=NULL, version=version+1 WHERE id=?",
              (error, now, now + retention, row["id"]))
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


def fail(c: sqlite3.Connection, lease: Lease, error: str, retention: float) -> bool:
    with Tx(c):
        row = holds(c, lease)
        if row is None:
            return False
        finish_failed(c, row, error, retention)
        return True


def worker_alive(c: sqlite3.Connection, worker_id: str, ttl: float) -> None:
    with Tx(c):
        c.execute("INSERT OR REPLACE INTO workers(id, seen_until) VALUES (?,?)", (worker_id, time.time() + ttl))


def stats(c: sqlite3.Connection) -> StoreStats:
    counts = dict(c.execute(
        "SELECT state, COUNT(*) FROM jobs WHERE state IN ('QUEUED','PROCESSING') GROUP BY state"
    ).fetchall())
    (alive,) = c.execute("SELECT COUNT(*) FROM workers WHERE seen_until>?", (time.time(),)).fetchone() or (0,)
    ctr = dict(c.execute("SELECT name, value FROM counters").fetchall())
    return StoreStats(queued=counts.get("QUEUED", 0), processing=counts.get("PROCESSING", 0),
                      workers_alive=int(alive), reclaims=ctr.get("reclaims", 0),
                      dead_letters=ctr.get("dead_letters", 0))


def expire(c: sqlite3.Connection) -> list[str]:
    """Delete the jobs past their retention (and what hangs on them); their ids, for their blobs."""
    now = time.time()
    with Tx(c):
        ids = [r[0] for r in c.execute("SELECT id FROM jobs WHERE expires_at<=?", (now,))]
        c.execute("DELETE FROM jobs WHERE expires_at<=?", (now,))
        previews.sweep(c, now)
        c.execute("DELETE FROM workers WHERE seen_until<?", (now - 3600,))
        hooks.expire(c, now)
    return ids
