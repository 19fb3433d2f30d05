"""The rows of the SQLite store: transactions, counters, ledger entries, and records as `Job` / `ApiKey`."""

from __future__ import annotations

import json
import sqlite3
import time

from kolors_api.jobs.base import ApiKey, Job, JobState


class Tx:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


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
