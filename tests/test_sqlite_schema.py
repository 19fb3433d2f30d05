"""The SQLite store's schema: one schema, versioned migrations on `PRAGMA user_version`.

A database made before the versioned schema (user_version 0, made by the four `SCHEMA` strings and the
two `migrate()`s of sqlite.py, sqlite_hooks.py, sqlite_previews.py and sqlite_fair.py at main 0f15809,
copied below as they were) is upgraded in place on open: jobs, keys, the ledger, webhooks, previews and
the fair queue are all there after, and the store works on them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from kolors_api.jobs import JobState, Lease, NewJob, StoreError
from kolors_api.jobs.base import destination, hash_key
from kolors_api.jobs.fair import work
from kolors_api.jobs.sqlite import SQLiteStore
from kolors_api.jobs.sqlite_schema import VERSION

# -- the schema as the code before the versioned one made it (copied verbatim)
OLD_STORE_SCHEMA = """
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

OLD_HOOKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
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
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries(state, next_at);
CREATE INDEX IF NOT EXISTS webhook_job ON webhook_deliveries(job_id);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    latency REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_attempts_job ON webhook_attempts(job_id, seq);
CREATE TABLE IF NOT EXISTS webhook_secrets (key_id TEXT PRIMARY KEY, secret TEXT NOT NULL);
"""

OLD_PREVIEWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS previews (job_id TEXT PRIMARY KEY, step INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS preview_watches (job_id TEXT PRIMARY KEY, until REAL NOT NULL);
"""

OLD_FAIR_SCHEMA = """
CREATE TABLE IF NOT EXISTS fair_keys (
    key_id TEXT PRIMARY KEY,
    start REAL,
    finish REAL NOT NULL DEFAULT 0,
    odo REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS fair_active ON fair_keys(start, key_id) WHERE start IS NOT NULL;
CREATE TABLE IF NOT EXISTS fair_clock (id INTEGER PRIMARY KEY CHECK (id = 0), vtime REAL NOT NULL);
INSERT OR IGNORE INTO fair_clock(id, vtime) VALUES (0, 0);
"""

#: What the old `sqlite_fair.migrate` and `sqlite_hooks.migrate` added after the SCHEMA strings.
OLD_MIGRATIONS = (
    "ALTER TABLE jobs ADD COLUMN work REAL NOT NULL DEFAULT 1",
    "ALTER TABLE jobs ADD COLUMN odo REAL NOT NULL DEFAULT 0",
    "ALTER TABLE keys ADD COLUMN weight REAL NOT NULL DEFAULT 1",
    "CREATE INDEX IF NOT EXISTS jobs_fair ON jobs(key_id, state, odo, seq)",
    "CREATE INDEX IF NOT EXISTS webhook_dest_due ON webhook_deliveries(state, dest, next_at)",
)

HOOK = "http://127.0.0.1:9/hook"
PARAMS = {"prompt": "a fox", "seed": 1, "steps": 2, "width": 512, "height": 512, "number_of_images": 1,
          "output_format": "png"}


def make_old_database(path: Path, *, migrated: bool) -> float:
    """A database as the old code left it, with rows: `migrated` False is the SCHEMA strings alone
    (no jobs.work, jobs.odo, keys.weight), True with what the old `migrate()`s added. Its time."""
    now = time.time()
    w = work(PARAMS)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_STORE_SCHEMA + OLD_HOOKS_SCHEMA + OLD_PREVIEWS_SCHEMA + OLD_FAIR_SCHEMA)
        if migrated:
            for sql in OLD_MIGRATIONS:
                db.execute(sql)
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
        db.execute("BEGIN")
        keys = [("k1", "one", "kol_one", hash_key("kol_one-secret"), 0, 1, 7.0, None, None, now - 100),
                ("k2", "two", "kol_two", hash_key("kol_two-secret"), 1, 1, None, "10/minute", 5, now - 90)]
        for k in keys:
            db.execute("INSERT INTO keys(id, name, prefix, key_hash, admin, enabled, credits, rate_limit, "
                       "max_concurrency, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)", k)
        if migrated:
            db.execute("UPDATE keys SET weight=3 WHERE id='k1'")
        for request_id, kind, amount in (("", "topup", 10.0), ("q1", "reserve", -1.0), ("p1", "reserve", -1.0),
                                          ("c1", "reserve", -1.0), ("c1", "capture", 0.0)):
            db.execute("INSERT INTO ledger(key_id, request_id, kind, amount, at) VALUES (?,?,?,?,?)",
                       ("k1", request_id, kind, amount, now - 50))
        hook = json.dumps({"url": HOOK, "events": ["start", "completed"]})
        jobs = [  # id, state, key, cost, created, started, finished, deliveries, token, until, expires, webhook
            ("c1", "COMPLETED", "k1", 1.0, now - 40, now - 39, now - 38, 1, "t-c1", None, now + 3600, hook),
            ("p1", "PROCESSING", "k1", 1.0, now - 30, now - 29, None, 1, "t-p1", now + 600, None, None),
            ("q1", "QUEUED", "k1", 1.0, now - 20, None, None, 0, None, None, None, hook),
            ("q2", "QUEUED", "k2", 0.0, now - 10, None, None, 0, None, None, None, None),
        ]
        for (job_id, state, key_id, cost, created, started, finished, deliveries, token, until, expires,
             webhook) in jobs:
            db.execute("INSERT INTO jobs(id, model, params, state, key_id, cost, created_at, started_at, finished_at, "
                       "deliveries, lease_token, lease_worker, lease_until, expires_at, webhook, version, "
                       "idempotency_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (job_id, "kolors", json.dumps(PARAMS), state, key_id, cost, created, started, finished,
                        deliveries, token, "old-worker" if token else None, until, expires, webhook, 3,
                        "idem-1" if job_id == "q1" else None))
        db.execute("UPDATE jobs SET outputs=1, ext='png', seeds='[5]', step=2, total_steps=2, metrics=? "
                   "WHERE id='c1'", (json.dumps({"total": 1.5}),))
        db.execute("UPDATE jobs SET step=1, total_steps=2, phase='denoising' WHERE id='p1'")
        if migrated:  # the fair queue as the old code kept it: both keys active, each job its odometer
            db.execute("UPDATE jobs SET work=?", (w,))
            db.execute("UPDATE jobs SET odo=? WHERE id='q1'", (2 * w,))
            db.execute("INSERT INTO fair_keys(key_id, start, finish, odo) VALUES ('k1', ?, ?, ?), ('k2', 0, 0, ?)",
                       (w / 3, w / 3, 3 * w, w))
            db.execute("UPDATE fair_clock SET vtime=? WHERE id=0", (w / 3,))
        db.execute("INSERT INTO idempotency(key_id, idem_key, job_id, request_hash, expires_at) VALUES (?,?,?,?,?)",
                   ("k1", "idem-1", "q1", "hash-1", now + 3600))
        db.execute("INSERT INTO webhook_deliveries(id, job_id, key_id, event, url, dest, attempts, next_at, "
                   "changed_at) VALUES (?,?,?,?,?,?,1,?,?)", ("c1-completed", "c1", "k1", "completed", HOOK,
                                                              destination(HOOK), now - 5, now - 5))
        db.execute("INSERT INTO webhook_attempts(job_id, delivery_id, event, attempt, at, status, latency, error) "
                   "VALUES (?,?,?,?,?,?,?,?)", ("c1", "c1-completed", "completed", 1, now - 6, 500, 0.02, "HTTP 500"))
        db.execute("INSERT INTO webhook_secrets(key_id, secret) VALUES ('k1', 'whsec_old')")
        db.execute("INSERT INTO previews(job_id, step, data) VALUES ('p1', 1, ?)", (b"preview-1",))
        db.execute("INSERT INTO counters(name, value) VALUES ('reclaims', 4), ('dead_letters', 1)")
        db.execute("INSERT INTO dead_letters(job_id, reason, at) VALUES ('gone', 'worker lost 3 times', ?)", (now,))
        db.execute("COMMIT")
    return now


def columns(path: Path) -> dict[str, set[str]]:
    """Every table's columns, and the index names (under "indexes")."""
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
        out = {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
        out["indexes"] = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                                   "AND name NOT LIKE 'sqlite_%'")}
        return out


def user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


@pytest.mark.parametrize("migrated", [False, True], ids=["schema-strings", "after-old-migrate"])
async def test_an_old_database_is_upgraded_in_place_and_keeps_working(tmp_path: Path, migrated: bool) -> None:
    path = tmp_path / "kolors-api.sqlite3"
    make_old_database(path, migrated=migrated)
    store = SQLiteStore(path)
    await store.open()
    try:
        assert user_version(path) == VERSION
        # everything is there, as it was
        done = await store.get("c1")
        assert done is not None and done.state == JobState.COMPLETED and done.outputs == 1 and done.seeds == [5]
        assert done.metrics == {"total": 1.5} and done.params == PARAMS and done.key_id == "k1"
        running = await store.get("p1")
        assert running is not None and running.state == JobState.PROCESSING and running.phase == "denoising"
        assert running.step == 1 and running.deliveries == 1
        for job_id in ("q1", "q2"):
            queued = await store.get(job_id)
            assert queued is not None and queued.state == JobState.QUEUED and queued.version == 3
        one = await store.key_by_hash(hash_key("kol_one-secret"))
        assert one is not None and one.id == "k1" and one.credits == 7.0 and not one.admin
        assert one.weight == (3.0 if migrated else 1.0)
        two = await store.get_key("k2")
        assert two is not None and two.admin and two.credits is None and two.rate_limit == "10/minute"
        assert two.max_concurrency == 5 and two.weight == 1.0
        assert [k.id for k in await store.list_keys()] == ["k1", "k2"]
        assert [(e.request_id, e.kind) for e in await store.ledger("k1")] == [
            ("", "topup"), ("q1", "reserve"), ("p1", "reserve"), ("c1", "reserve"), ("c1", "capture")]
        assert await store.running_count("k1") == 2
        assert await store.idempotent_request("k1", "idem-1") == ("q1", "hash-1")
        assert await store.current_webhook_secret("k1") == "whsec_old"
        (attempt,) = await store.webhook_attempts("c1")
        assert attempt.delivery_id == "c1-completed" and attempt.status == 500 and attempt.error == "HTTP 500"
        assert await store.read_preview("p1") == (1, b"preview-1")
        stats = await store.stats()
        assert (stats.queued, stats.processing, stats.reclaims, stats.dead_letters) == (2, 1, 4, 1)
        positions = {await store.queue_position("q1"), await store.queue_position("q2")}
        assert positions == {0, 1}
        # and it works on them: the pending delivery is due (per destination too), the old lease still
        # fences its holder, the queued jobs are claimed in the fair order, a new submit is charged
        (due,) = await store.claim_webhooks(30, 10, per_destination=1)
        assert (due.id, due.job_id, due.attempt, due.url) == ("c1-completed", "c1", 2, HOOK)
        old = Lease(job=running, token="t-p1", worker_id="old-worker", delivery=1)
        assert await store.heartbeat(old, 30)
        assert not await store.heartbeat(Lease(job=running, token="forged", worker_id="x", delivery=1), 30)
        assert await store.progress(old, 2, 2)
        assert await store.complete(old, [b"img"], "png", [9], {})
        finished = await store.get("p1")
        assert finished is not None and finished.state == JobState.COMPLETED
        claimed = [await store.claim("w1", 30, 0.1) for _ in range(2)]
        assert {lease.job.id for lease in claimed if lease is not None} == {"q1", "q2"}
        # the old fair tags kept (k2's start is the smaller), or both keys activated at the same tag
        assert [lease.job.id for lease in claimed if lease is not None] == (["q2", "q1"] if migrated else ["q1", "q2"])
        assert await store.claim("w1", 30, 0) is None
        (start,) = await store.claim_webhooks(30, 10)
        assert (start.job_id, start.event) == ("q1", "start")
        new = await store.submit(NewJob(model="kolors", params=PARAMS, cost=2.0, key_id="k1"))
        assert new.state == JobState.QUEUED
        again = await store.get_key("k1")
        assert again is not None and again.credits == 5.0
        assert await store.request_cancel(new.id) is not None
        refunded = await store.get_key("k1")
        assert refunded is not None and refunded.credits == 7.0
    finally:
        await store.close()
    # opened again: nothing to migrate, nothing lost
    again_store = SQLiteStore(path)
    try:
        await again_store.open()
        assert user_version(path) == VERSION
        got = await again_store.get("c1")
        assert got is not None and got.state == JobState.COMPLETED
        assert len(await again_store.ledger("k1")) == 8  # 5 old, capture, reserve, refund
    finally:
        await again_store.close()


@pytest.mark.parametrize("migrated", [False, True], ids=["schema-strings", "after-old-migrate"])
async def test_an_upgraded_database_has_the_schema_of_a_new_one(tmp_path: Path, migrated: bool) -> None:
    make_old_database(tmp_path / "old.sqlite3", migrated=migrated)
    for name in ("old.sqlite3", "new.sqlite3"):
        store = SQLiteStore(tmp_path / name)
        await store.open()
        await store.close()
    assert columns(tmp_path / "old.sqlite3") == columns(tmp_path / "new.sqlite3")
    assert user_version(tmp_path / "old.sqlite3") == user_version(tmp_path / "new.sqlite3") == VERSION


async def test_processes_opening_an_old_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "kolors-api.sqlite3"
    make_old_database(path, migrated=True)
    stores = [SQLiteStore(path) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert user_version(path) == VERSION
        jobs = [await s.get("q1") for s in stores]
        assert all(j is not None and j.state == JobState.QUEUED for j in jobs)
    finally:
        for s in stores:
            await s.close()


async def test_a_database_of_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "kolors-api.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version={VERSION + 1}")
    newer = SQLiteStore(path)
    try:
        with pytest.raises(StoreError, match=f"schema version {VERSION + 1}"):
            await newer.open()
    finally:
        await newer.close()
    assert user_version(path) == VERSION + 1
