"""The SQLite store's API keys, credits ledger and per-key counts (functions on the store's connection).

A key's balance and its ledger change in one transaction: the balance always equals the sum of
the ledger's entries (a top-up writes the entry that brings the sum to the new balance).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from kolors_api.jobs.base import (
    KEY_FIELDS,
    MAX_CREDITS,
    AlreadyExists,
    ApiKey,
    BalanceOutOfRange,
    LedgerEntry,
    credits_of,
    micro,
)
from kolors_api.jobs.sqlite_rows import Tx, key_of


def add(c: sqlite3.Connection, key: ApiKey) -> None:
    with Tx(c):
        if c.execute("SELECT 1 FROM keys WHERE id=? OR key_hash=?", (key.id, key.key_hash)).fetchone():
            raise AlreadyExists(f"key {key.id} already exists")
        c.execute("INSERT INTO keys(id, name, prefix, key_hash, admin, enabled, credits, rate_limit, "
                  "max_concurrency, created_at, weight) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                  (key.id, key.name, key.prefix, key.key_hash, int(key.admin), int(key.enabled),
                   None if key.credits is None else credits_of(micro(key.credits)), key.rate_limit,
                   key.max_concurrency, key.created_at, key.weight))
        if key.credits:
            c.execute("INSERT INTO ledger(key_id, request_id, kind, amount, at) VALUES (?,?,?,?,?)",
                      (key.id, "", "topup", credits_of(micro(key.credits)), time.time()))


def by_id(c: sqlite3.Connection, key_id: str) -> ApiKey | None:
    row = c.execute("SELECT * FROM keys WHERE id=?", (key_id,)).fetchone()
    return key_of(row) if row is not None else None


def by_hash(c: sqlite3.Connection, key_hash: str) -> ApiKey | None:
    row = c.execute("SELECT * FROM keys WHERE key_hash=?", (key_hash,)).fetchone()
    return key_of(row) if row is not None else None


def all_keys(c: sqlite3.Connection) -> list[ApiKey]:
    return [key_of(r) for r in c.execute("SELECT * FROM keys ORDER BY created_at")]


def update(c: sqlite3.Connection, key_id: str, changes: dict[str, Any]) -> ApiKey | None:
    now = time.time()
    with Tx(c):
        row = c.execute("SELECT * FROM keys WHERE id=?", (key_id,)).fetchone()
        if row is None:
            return None
        new: int | None = None
        if "credits" in changes:
            new = None if changes["credits"] is None else micro(changes["credits"])
        elif "add_credits" in changes:
            # checked here, in the transaction that writes it: no submit can come between
            new = micro(row["credits"] or 0) + micro(changes["add_credits"])
            if not 0 <= new <= micro(MAX_CREDITS):
                raise BalanceOutOfRange(credits_of(new))
        for name in KEY_FIELDS:
            if name in changes:
                c.execute(f"UPDATE keys SET {name}=? WHERE id=?", (changes[name], key_id))  # noqa: S608
        if "credits" in changes or "add_credits" in changes:
            c.execute("UPDATE keys SET credits=? WHERE id=?",
                      (None if new is None else credits_of(new), key_id))
            if new is not None:
                # the entry brings the ledger's sum to the new balance (also after a time
                # without a limit, when usage entries moved no balance)
                total = sum(micro(a) for (a,) in c.execute("SELECT amount FROM ledger WHERE key_id=?",
                                                          (key_id,)))
                c.execute("INSERT INTO ledger(key_id, request_id, kind, amount, at) VALUES (?,?,?,?,?)",
                          (key_id, "", "topup", credits_of(new - total), now))
    return by_id(c, key_id)


def delete(c: sqlite3.Connection, key_id: str) -> bool:
    with Tx(c):
        return c.execute("DELETE FROM keys WHERE id=?", (key_id,)).rowcount == 1


def ledger(c: sqlite3.Connection, key_id: str) -> list[LedgerEntry]:
    return [LedgerEntry(key_id=r["key_id"], request_id=r["request_id"], kind=r["kind"],
                        amount=r["amount"], at=r["at"])
            for r in c.execute("SELECT * FROM ledger WHERE key_id=? ORDER BY seq", (key_id,))]


def running_count(c: sqlite3.Connection, key_id: str) -> int:
    row = c.execute("SELECT COUNT(*) FROM jobs WHERE key_id=? AND state IN ('QUEUED','PROCESSING')",
                    (key_id,)).fetchone()
    return int(row[0]) if row else 0
