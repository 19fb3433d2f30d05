"""The SQLite store's schema: the tables as they are now, and the migrations that bring any older
database to them, numbered by `PRAGMA user_version`.

`MIGRATIONS[n]` takes a database of version n to n + 1; `VERSION` is the version this code writes.
`migrate` runs the missing steps, each in its own write transaction that also sets user_version, so
processes opening one file at once migrate it once (the others wait on the lock, then see the new
version). To change the schema, append a step; never edit one that has shipped. A database of a
newer version than this code knows is refused, untouched.

Version 0 is every database made before the versioned schema (no user_version set): step 1 adopts
it whatever columns it has (the fair queue's `jobs.work`, `jobs.odo` and `keys.weight`, the job's
`phase` and the delivery's `dest` came one by one), and creates a new database from nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from kolors_api.jobs.base import StoreError, destination
from kolors_api.jobs.sqlite_rows import Tx

#: The tables of version 1. CREATE TABLE IF NOT EXISTS: step 1 keeps the tables an older database has.
_TABLES = (
    """CREATE TABLE IF NOT EXISTS jobs (
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
    phase TEXT NOT NULL DEFAULT '',
    work REAL NOT NULL DEFAULT 1,
    odo REAL NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT UNIQUE NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    enabled INTEGER NOT NULL DEFAULT 1,
    credits REAL,
    rate_limit TEXT,
    max_concurrency INTEGER,
    created_at REAL NOT NULL,
    weight REAL NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount REAL NOT NULL,
    at REAL NOT NULL
)""",
    "CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, seen_until REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dead_letters (job_id TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL)",
    # the fair queue (sqlite_fair.py)
    """CREATE TABLE IF NOT EXISTS fair_keys (
    key_id TEXT PRIMARY KEY,
    start REAL,
    finish REAL NOT NULL DEFAULT 0,
    odo REAL NOT NULL DEFAULT 0
)""",
    "CREATE TABLE IF NOT EXISTS fair_clock (id INTEGER PRIMARY KEY CHECK (id = 0), vtime REAL NOT NULL)",
    # Idempotency-Keys and the webhook outbox (sqlite_hooks.py)
    """CREATE TABLE IF NOT EXISTS idempotency (
    key_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, idem_key)
)""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    key_id TEXT,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    dest TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    token TEXT,
    changed_at REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS webhook_attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    latency REAL NOT NULL,
    error TEXT
)""",
    "CREATE TABLE IF NOT EXISTS webhook_secrets (key_id TEXT PRIMARY KEY, secret TEXT NOT NULL)",
    # the latest preview of each job (sqlite_previews.py)
    "CREATE TABLE IF NOT EXISTS previews (job_id TEXT PRIMARY KEY, step INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS preview_watches (job_id TEXT PRIMARY KEY, until REAL NOT NULL)",
)

#: Columns that databases of version 0 may lack, added before the indexes that use them.
_LATER_COLUMNS = (("jobs", "phase", "TEXT NOT NULL DEFAULT ''"), ("jobs", "work", "REAL NOT NULL DEFAULT 1"),
                  ("jobs", "odo", "REAL NOT NULL DEFAULT 0"), ("keys", "weight", "REAL NOT NULL DEFAULT 1"),
                  ("webhook_deliveries", "dest", "TEXT NOT NULL DEFAULT ''"))

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key_id, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_fair ON jobs(key_id, state, odo, seq)",
    "CREATE INDEX IF NOT EXISTS ledger_key ON ledger(key_id, seq)",
    "CREATE INDEX IF NOT EXISTS fair_active ON fair_keys(start, key_id) WHERE start IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries(state, next_at)",
    "CREATE INDEX IF NOT EXISTS webhook_job ON webhook_deliveries(job_id)",
    "CREATE INDEX IF NOT EXISTS webhook_dest_due ON webhook_deliveries(state, dest, next_at)",
    "CREATE INDEX IF NOT EXISTS webhook_attempts_job ON webhook_attempts(job_id, seq)",
)


def _columns(c: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in c.execute(f"PRAGMA table_info({table})")}


def _v1_tables(c: sqlite3.Connection) -> None:
    """Version 1: the tables above, from nothing or from a database of before the versioned schema."""
    for sql in _TABLES:
        c.execute(sql)
    for table, column, decl in _LATER_COLUMNS:
        if column not in _columns(c, table):
            c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if column == "dest":  # deliveries of before the per-destination bound: their destination
                for row in c.execute("SELECT id, url FROM webhook_deliveries").fetchall():
                    c.execute("UPDATE webhook_deliveries SET dest=? WHERE id=?", (destination(row[1]), row[0]))
    for sql in _INDEXES:
        c.execute(sql)
    c.execute("INSERT OR IGNORE INTO fair_clock(id, vtime) VALUES (0, 0)")


#: The steps: MIGRATIONS[n] takes version n to n + 1, inside the transaction `migrate` opens.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1_tables,)
#: The schema version this code reads and writes.
VERSION = len(MIGRATIONS)


def version(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA user_version").fetchone()[0])


def file_version(path: Path) -> int | None:
    """The schema version of the database file at `path`, read without writing; None without one."""
    if not path.is_file():
        return None
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as c:
        return version(c)


def migrate(c: sqlite3.Connection) -> None:
    """Bring the database on `c` (autocommit, no transaction open) to `VERSION`; StoreError when it
    is newer than this code."""
    while (at := version(c)) < VERSION:
        with Tx(c):
            if (at := version(c)) < VERSION:  # another process may have migrated while this one waited
                MIGRATIONS[at](c)
                c.execute(f"PRAGMA user_version={at + 1}")
    if at > VERSION:
        raise StoreError(f"the database has schema version {at}, newer than this kolors-api knows ({VERSION}): "
                         "run the kolors-api that made it, or a newer one")
