"""The latest preview of each job in the SQLite store: one row per job, replaced at each preview.

A row is written in the transaction of the progress it belongs to (`write`, `watched`), and swept
with the jobs that `expire` deletes (`sweep`); `read` and `watch` are the store's own calls.
"""

from __future__ import annotations

import sqlite3

from kolors_api.jobs.sqlite_rows import Tx


def write(c: sqlite3.Connection, job_id: str, step: int, data: bytes) -> None:
    c.execute("INSERT OR REPLACE INTO previews(job_id, step, data) VALUES (?,?,?)", (job_id, step, data))


def read(c: sqlite3.Connection, job_id: str) -> tuple[int, bytes] | None:
    row = c.execute("SELECT step, data FROM previews WHERE job_id=?", (job_id,)).fetchone()
    return None if row is None else (int(row[0]), bytes(row[1]))


def watch(c: sqlite3.Connection, job_id: str, until: float) -> None:
    """Someone watches the job's previews until `until` (epoch seconds)."""
    with Tx(c):
        c.execute("INSERT INTO preview_watches(job_id, until) VALUES (?,?) "
                  "ON CONFLICT(job_id) DO UPDATE SET until=max(until, excluded.until)", (job_id, until))


def watched(c: sqlite3.Connection, job_id: str, now: float) -> bool:
    return c.execute("SELECT 1 FROM preview_watches WHERE job_id=? AND until>?", (job_id, now)).fetchone() is not None


def sweep(c: sqlite3.Connection, now: float) -> None:
    """Drop the previews of jobs that are gone (expired), and the watches that ended."""
    c.execute("DELETE FROM previews WHERE job_id NOT IN (SELECT id FROM jobs)")
    c.execute("DELETE FROM preview_watches WHERE until<?", (now,))
