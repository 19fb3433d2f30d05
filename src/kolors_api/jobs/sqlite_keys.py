"""The SQLite store's API keys, credits ledger and per-key counts (a mixin of `SQLiteStore`).

A key's balance and its ledger change in one transaction: the balance always equals the sum of
the ledger's entries (a top-up writes the entry that brings the sum to the new balance).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

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

T = TypeVar("T")


class SQLiteKeys:
    """The key methods of `JobStore` for `SQLiteStore`."""

    if TYPE_CHECKING:
        _conn: sqlite3.Connection | None

        def _run(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...
        def _tx(self) -> Tx: ...
        def _q1(self, sql: str, *args: Any) -> sqlite3.Row | None: ...

    async def add_key(self, key: ApiKey) -> None:
        def q() -> None:
            with self._tx() as c:
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
        await self._run(q)

    def _key(self, where: str, arg: str) -> ApiKey | None:
        row = self._q1(f"SELECT * FROM keys WHERE {where}=?", arg)  # noqa: S608 - fixed column names
        return key_of(row) if row is not None else None

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        return await self._run(self._key, "key_hash", key_hash)

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await self._run(self._key, "id", key_id)

    async def list_keys(self) -> list[ApiKey]:
        def q() -> list[ApiKey]:
            assert self._conn is not None
            return [key_of(r) for r in self._conn.execute("SELECT * FROM keys ORDER BY created_at")]
        return await self._run(q)

    async def update_key(self, key_id: str, **changes: Any) -> ApiKey | None:
        def q() -> ApiKey | None:
            now = time.time()
            with self._tx() as c:
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
            return self._key("id", key_id)
        return await self._run(q)

    async def delete_key(self, key_id: str) -> bool:
        def q() -> bool:
            with self._tx() as c:
                return c.execute("DELETE FROM keys WHERE id=?", (key_id,)).rowcount == 1
        return await self._run(q)

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        def q() -> list[LedgerEntry]:
            assert self._conn is not None
            return [LedgerEntry(key_id=r["key_id"], request_id=r["request_id"], kind=r["kind"],
                                amount=r["amount"], at=r["at"])
                    for r in self._conn.execute("SELECT * FROM ledger WHERE key_id=? ORDER BY seq", (key_id,))]
        return await self._run(q)

    async def running_count(self, key_id: str) -> int:
        def q() -> int:
            row = self._q1("SELECT COUNT(*) FROM jobs WHERE key_id=? AND state IN ('QUEUED','PROCESSING')",
                           key_id)
            return int(row[0]) if row else 0
        return await self._run(q)
