"""The SQLite store's fair queue (`kolors_api.jobs.fair`): keys with queued work and their tags.

`fair_keys` holds, per key id (`fair.NO_KEY` for jobs without a key), its start tag while it has
queued jobs (`start`, NULL when it has none), its last finish tag and its odometer (work enqueued
so far); `fair_clock` the virtual time (tables in sqlite_schema.py). Each job row keeps its `work` and
`odo`. Every function here runs inside the transaction of the change it belongs to.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from kolors_api.jobs import fair


def activate_queued(c: sqlite3.Connection) -> None:
    """(Re)activate every key with queued jobs: jobs queued again by a recovery, or queued before the
    fair queue existed. Run when the store opens."""
    for (key_id,) in c.execute("SELECT DISTINCT key_id FROM jobs WHERE state='QUEUED'").fetchall():
        _activate(c, key_id or fair.NO_KEY)


def _vtime(c: sqlite3.Connection) -> float:
    return float(c.execute("SELECT vtime FROM fair_clock WHERE id=0").fetchone()[0])


def _key_row(c: sqlite3.Connection, fk: str) -> sqlite3.Row:
    row: sqlite3.Row | None = c.execute("SELECT * FROM fair_keys WHERE key_id=?", (fk,)).fetchone()
    if row is None:  # (inside the caller's write transaction: nobody adds it in between)
        c.execute("INSERT OR IGNORE INTO fair_keys(key_id) VALUES (?)", (fk,))
        row = c.execute("SELECT * FROM fair_keys WHERE key_id=?", (fk,)).fetchone()
    assert row is not None
    return row


def _activate(c: sqlite3.Connection, fk: str) -> None:
    row = _key_row(c, fk)
    if row["start"] is None:
        c.execute("UPDATE fair_keys SET start=? WHERE key_id=?", (fair.activate(row["finish"], _vtime(c)), fk))


def _job_key(key_id: str | None) -> str | None:
    return key_id or None


def weight(c: sqlite3.Connection, fk: str) -> float:
    row = c.execute("SELECT weight FROM keys WHERE id=?", (fk,)).fetchone() if fk else None
    return fair.weight_of(row[0]) if row is not None else fair.DEFAULT_WEIGHT


def _has_queued(c: sqlite3.Connection, fk: str) -> bool:
    return c.execute("SELECT 1 FROM jobs WHERE key_id IS ? AND state='QUEUED' LIMIT 1",
                     (_job_key(fk),)).fetchone() is not None


def enqueue(c: sqlite3.Connection, key_id: str | None, params: dict[str, Any]) -> tuple[float, float]:
    """A new QUEUED job's key moves its odometer on and is active; the job's (work, odometer), for
    its row (written by the caller)."""
    fk = key_id or fair.NO_KEY
    row = _key_row(c, fk)
    job_work = fair.work(params)
    if row["start"] is None:  # as `_activate`, in the same statement
        c.execute("UPDATE fair_keys SET odo=odo+?, start=? WHERE key_id=?",
                  (job_work, fair.activate(row["finish"], _vtime(c)), fk))
    else:
        c.execute("UPDATE fair_keys SET odo=odo+? WHERE key_id=?", (job_work, fk))
    return job_work, float(row["odo"])


def taken(c: sqlite3.Connection, key_id: str | None, job_work: float) -> None:
    """A QUEUED job of the key was claimed (after its row left QUEUED): charge the key."""
    fk = key_id or fair.NO_KEY
    row = _key_row(c, fk)
    start = row["start"] if row["start"] is not None else fair.activate(row["finish"], _vtime(c))
    finish, vtime = fair.served(start, _vtime(c), job_work, weight(c, fk))
    c.execute("UPDATE fair_clock SET vtime=? WHERE id=0", (vtime,))
    c.execute("UPDATE fair_keys SET finish=?, start=? WHERE key_id=?",
              (finish, finish if _has_queued(c, fk) else None, fk))


def left(c: sqlite3.Connection, key_id: str | None) -> None:
    """A QUEUED job of the key left the queue unserved (cancelled): no charge."""
    fk = key_id or fair.NO_KEY
    if not _has_queued(c, fk):
        c.execute("UPDATE fair_keys SET start=NULL WHERE key_id=?", (fk,))


def _head(c: sqlite3.Connection, fk: str, limit: int = 1) -> list[sqlite3.Row]:
    return c.execute("SELECT * FROM jobs WHERE key_id IS ? AND state='QUEUED' ORDER BY odo, seq LIMIT ?",
                     (_job_key(fk), limit)).fetchall()


def next_job(c: sqlite3.Connection) -> sqlite3.Row | None:
    """The head of the key with the smallest start tag (O(log n) through the indexes)."""
    while True:
        top = c.execute("SELECT key_id FROM fair_keys WHERE start IS NOT NULL ORDER BY start, key_id LIMIT 1"
                        ).fetchone()
        if top is None:
            return None
        head = _head(c, top[0])
        if head:
            return head[0]
        c.execute("UPDATE fair_keys SET start=NULL WHERE key_id=?", (top[0],))  # nothing queued after all


def candidates(c: sqlite3.Connection, window: int) -> list[fair.KeyQueue]:
    """The first queued jobs of the keys with the smallest tags, `window` jobs in all (for `Batch.choose`)."""
    keys = c.execute("SELECT key_id, start FROM fair_keys WHERE start IS NOT NULL ORDER BY start, key_id LIMIT ?",
                     (window,)).fetchall()
    each = fair.per_key(window, len(keys))
    return [fair.KeyQueue(key=fk, start=start, weight=weight(c, fk),
                          jobs=[(r["id"], json.loads(r["params"])) for r in _head(c, fk, each)])
            for fk, start in keys]


def position(c: sqlite3.Connection, row: sqlite3.Row) -> int:
    """How many queued jobs the fair order serves before this QUEUED one, if nothing else arrives."""
    fk = row["key_id"] or fair.NO_KEY
    keys = c.execute("SELECT key_id, start FROM fair_keys WHERE start IS NOT NULL").fetchall()
    mine = next((start for k, start in keys if k == fk), None)
    (ahead,) = c.execute("SELECT COUNT(*) FROM jobs WHERE key_id IS ? AND state='QUEUED' AND (odo<? OR (odo=? AND "
                         "seq<?))", (row["key_id"], row["odo"], row["odo"], row["seq"])).fetchone()
    if mine is None:
        return int(ahead)
    head = _head(c, fk)
    tag = mine + (row["odo"] - (head[0]["odo"] if head else row["odo"])) / weight(c, fk)
    for other, start in keys:
        if other == fk or start > tag:
            continue
        first = _head(c, other)
        if not first:
            continue
        limit = fair.bound(tag, start, weight(c, other), first[0]["odo"])
        op = "<=" if other < fk else "<"
        (n,) = c.execute(f"SELECT COUNT(*) FROM jobs WHERE key_id IS ? AND state='QUEUED' AND odo{op}?",  # noqa: S608
                         (_job_key(other), limit)).fetchone()
        ahead += n
    return int(ahead)
