"""The SQLite store's Idempotency-Keys and webhook outbox (functions on the store's connection).

Deliveries are rows of `webhook_deliveries`, written by `enqueue` inside the transaction of the job's
change (claim, progress, complete, fail), so a delivery exists exactly when its change does, whatever
process dies after. A claim pushes `next_at` one lease ahead and sets a token: a runner that dies
mid-attempt leaves a delivery that is due again when the lease runs out.

`replay_of`, `remember`, `enqueue` and `expire` run inside the transaction of the change they belong
to; the others are the store's webhook methods, each in a transaction of its own where it writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Mapping

from kolors_api.jobs.base import (
    CLAIM_LOOKAHEAD,
    IDEMPOTENCY_SECONDS,
    WEBHOOK_LOG_SECONDS,
    IdempotencyMismatch,
    NewJob,
    WebhookAttempt,
    WebhookDelivery,
    destination,
    new_webhook_secret,
)
from kolors_api.jobs.sqlite_rows import Tx


def replay_of(c: sqlite3.Connection, new: NewJob, now: float) -> str | None:
    """The job id a repeated Idempotency-Key stands for (None: a new request); IdempotencyMismatch
    when the key came with another request."""
    if new.idempotency_key is None:
        return None
    row = c.execute("SELECT job_id, request_hash FROM idempotency WHERE key_id=? AND idem_key=? AND expires_at>?",
                    (new.key_id or "", new.idempotency_key, now)).fetchone()
    if row is None:
        return None
    if row["request_hash"] != new.request_hash:
        raise IdempotencyMismatch()
    return str(row["job_id"])


def remember(c: sqlite3.Connection, new: NewJob, now: float) -> None:
    if new.idempotency_key is not None:
        c.execute("INSERT OR REPLACE INTO idempotency(key_id, idem_key, job_id, request_hash, expires_at) "
                  "VALUES (?,?,?,?,?)", (new.key_id or "", new.idempotency_key, new.id, new.request_hash,
                                         now + IDEMPOTENCY_SECONDS))


def enqueue(c: sqlite3.Connection, job_id: str, event: str) -> None:
    """Put `event` of the job in the outbox when its webhook asks for it (inside the change's transaction)."""
    row = c.execute("SELECT webhook, key_id FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None or not row["webhook"]:
        return
    hook = json.loads(row["webhook"])
    if event not in hook["events"]:
        return
    if c.execute("SELECT 1 FROM webhook_deliveries WHERE job_id=? AND state='stopped'", (job_id,)).fetchone():
        return  # the receiver answered 410 for this job
    delivery_id = f"{job_id}-{event}"
    if event == "progress":
        # one waiting progress delivery at a time: it carries the status when it is sent
        if c.execute("SELECT 1 FROM webhook_deliveries WHERE job_id=? AND event='progress' AND attempts=0 "
                     "AND state='pending'", (job_id,)).fetchone():
            return
        delivery_id = f"{job_id}-progress-{uuid.uuid4().hex[:8]}"
    now = time.time()
    c.execute("INSERT OR IGNORE INTO webhook_deliveries(id, job_id, key_id, event, url, dest, next_at, changed_at) "
              "VALUES (?,?,?,?,?,?,?,?)", (delivery_id, job_id, row["key_id"], event, hook["url"],
                                           destination(hook["url"]), now, now))


def expire(c: sqlite3.Connection, now: float) -> None:
    c.execute("DELETE FROM idempotency WHERE expires_at<=?", (now,))
    c.execute("DELETE FROM webhook_deliveries WHERE state!='pending' AND changed_at<=?", (now - WEBHOOK_LOG_SECONDS,))
    c.execute("DELETE FROM webhook_attempts WHERE at<=?", (now - WEBHOOK_LOG_SECONDS,))


def idempotent_request(c: sqlite3.Connection, key_id: str, idempotency_key: str) -> tuple[str, str] | None:
    row = c.execute("SELECT job_id, request_hash FROM idempotency WHERE key_id=? AND idem_key=? "
                    "AND expires_at>?", (key_id, idempotency_key, time.time())).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def claim_webhooks(c: sqlite3.Connection, lease_seconds: float, limit: int, per_destination: int,
                   busy: Mapping[str, int] | None, per_key: int,
                   busy_keys: Mapping[str, int] | None) -> list[WebhookDelivery]:
    now, token = time.time(), uuid.uuid4().hex
    out: list[WebhookDelivery] = []
    if c.execute("SELECT 1 FROM webhook_deliveries WHERE state='pending' AND next_at<=? LIMIT 1",
                 (now,)).fetchone() is None:
        return out  # nothing due: no write lock taken (runners poll this twice a second)
    keys = dict(busy_keys or {})

    def key_room(row: sqlite3.Row) -> bool:
        # within the key's bound: counted as taken
        key = row["key_id"] or ""
        if per_key > 0 and keys.get(key, 0) >= per_key:
            return False
        keys[key] = keys.get(key, 0) + 1
        return True

    def take(due: list[sqlite3.Row], room: int) -> list[sqlite3.Row]:
        out: list[sqlite3.Row] = []
        for r in due:
            if len(out) >= room:
                break
            if key_room(r):
                out.append(r)
        return out

    with Tx(c):
        rows: list[sqlite3.Row] = []
        if per_destination <= 0:
            due = c.execute("SELECT * FROM webhook_deliveries WHERE state='pending' AND next_at<=? "
                            "ORDER BY next_at LIMIT ?", (now, limit + (CLAIM_LOOKAHEAD if per_key else 0)))
            rows = take(due.fetchall(), limit)
        else:
            for dest, _ in c.execute("SELECT dest, MIN(next_at) AS due FROM webhook_deliveries WHERE "
                                     "state='pending' AND next_at<=? GROUP BY dest ORDER BY due",
                                     (now,)).fetchall():
                room = min(per_destination - (busy or {}).get(dest, 0), limit - len(rows))
                if room > 0:
                    due = c.execute("SELECT * FROM webhook_deliveries WHERE state='pending' AND dest=? "
                                    "AND next_at<=? ORDER BY next_at LIMIT ?",
                                    (dest, now, room + (CLAIM_LOOKAHEAD if per_key else 0)))
                    rows += take(due.fetchall(), room)
        for r in rows:
            c.execute("UPDATE webhook_deliveries SET attempts=attempts+1, token=?, next_at=?, changed_at=? "
                      "WHERE id=?", (token, now + lease_seconds, now, r["id"]))
            out.append(WebhookDelivery(id=r["id"], job_id=r["job_id"], key_id=r["key_id"], event=r["event"],
                                       url=r["url"], attempt=r["attempts"] + 1, token=token))
    return out


def record_webhook(c: sqlite3.Connection, delivery: WebhookDelivery, attempt: WebhookAttempt, state: str,
                   next_at: float) -> bool:
    now = time.time()
    with Tx(c):
        cur = c.execute("UPDATE webhook_deliveries SET state=?, next_at=?, token=NULL, changed_at=? "
                        "WHERE id=? AND token=?", (state, next_at, now, delivery.id, delivery.token))
        if cur.rowcount != 1:
            return False
        c.execute("INSERT INTO webhook_attempts(job_id, delivery_id, event, attempt, at, status, latency, "
                  "error) VALUES (?,?,?,?,?,?,?,?)",
                  (delivery.job_id, delivery.id, attempt.event, attempt.attempt, attempt.at, attempt.status,
                   attempt.latency, attempt.error))
        if state == "stopped":
            c.execute("UPDATE webhook_deliveries SET state='stopped', changed_at=? WHERE job_id=? AND "
                      "state='pending'", (now, delivery.job_id))
        return True


def webhook_attempts(c: sqlite3.Connection, job_id: str) -> list[WebhookAttempt]:
    rows = c.execute("SELECT * FROM webhook_attempts WHERE job_id=? ORDER BY seq", (job_id,))
    return [WebhookAttempt(delivery_id=r["delivery_id"], event=r["event"], attempt=r["attempt"], at=r["at"],
                           status=r["status"], latency=r["latency"], error=r["error"]) for r in rows]


def webhook_secret(c: sqlite3.Connection, key_id: str) -> str:
    with Tx(c):
        c.execute("INSERT OR IGNORE INTO webhook_secrets(key_id, secret) VALUES (?,?)",
                  (key_id, new_webhook_secret()))
        return str(c.execute("SELECT secret FROM webhook_secrets WHERE key_id=?", (key_id,)).fetchone()[0])


def rotate_webhook_secret(c: sqlite3.Connection, key_id: str) -> str:
    secret = new_webhook_secret()
    with Tx(c):
        c.execute("INSERT OR REPLACE INTO webhook_secrets(key_id, secret) VALUES (?,?)", (key_id, secret))
    return secret


def current_webhook_secret(c: sqlite3.Connection, key_id: str) -> str | None:
    row = c.execute("SELECT secret FROM webhook_secrets WHERE key_id=?", (key_id,)).fetchone()
    return None if row is None else str(row[0])
