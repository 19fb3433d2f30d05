"""The rows of the SQLite store: transactions, leases, ledger entries, and records as `Job` / `ApiKey`."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

from kolors_api.jobs import sqlite_fair as fair_db
from kolors_api.jobs import sqlite_hooks as hooks
from kolors_api.jobs.base import ApiKey, Job, JobState, Lease


class Tx:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


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


def bump(c: sqlite3.Connection, name: str) -> None:
    c.execute("INSERT INTO counters(name, value) VALUES (?, 1) "
              "ON CONFLICT(name) DO UPDATE SET value=value+1", (name,))


def ledger_entry(c: sqlite3.Connection, row: sqlite3.Row, kind: str, amount: float) -> None:
    c.execute("INSERT INTO ledger(key_id, request_id, kind, amount, at) VALUES (?,?,?,?,?)",
              (row["key_id"], row["id"], kind, amount, time.time()))


def job_of(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], model=row["model"], params=json.loads(row["params"]), state=JobState(row["state"]),
        created_at=row["created_at"], key_id=row["key_id"], cost=row["cost"], started_at=row["started_at"],
        finished_at=row["finished_at"], step=row["step"], total_steps=row["total_steps"], error=row["error"],
        outputs=row["outputs"], ext=row["ext"], seeds=json.loads(row["seeds"]),
        metrics=json.loads(row["metrics"]), deliveries=row["deliveries"],
        cancel_requested=bool(row["cancel_requested"]), version=row["version"],
        expires_at=row["expires_at"] or 0.0, phase=row["phase"],
    )


def key_of(row: sqlite3.Row) -> ApiKey:
    return ApiKey(id=row["id"], name=row["name"], prefix=row["prefix"], key_hash=row["key_hash"],
                  admin=bool(row["admin"]), enabled=bool(row["enabled"]), credits=row["credits"],
                  rate_limit=row["rate_limit"], max_concurrency=row["max_concurrency"],
                  created_at=row["created_at"], weight=row["weight"])
