"""The API key methods of `RedisStore` (a mixin), and the key records it keeps by key hash, so that
a request's authentication costs no round trip.

Only records without credits are kept (a balance moves with every submit; the rest of a record
changes only through `update_key` and `delete_key`). Every change of a key record publishes on the
``keys-changed`` channel (`SCRIPT_UPDATE_KEY`, `SCRIPT_DELETE_KEY`), and every store subscribed there
empties its cache when it hears one, or when its subscription breaks; records are kept only while the
subscription is confirmed and unbroken. A change made through this store empties its cache at once;
another process hears it within the publication's latency (well under a millisecond on one network),
so a revoked key is refused from then on. A record is kept `SECONDS` at most in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import KEY_FIELDS, AlreadyExists, ApiKey, BalanceOutOfRange, LedgerEntry, credits_of, micro
from kolors_api.jobs.redis_codec import encode, flat_hash, hash_of, key_of, str_of

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from kolors_api.jobs.redis_keys import Keys


class KeyCache:
    """Key records by key hash (see the module docstring)."""

    #: The longest a record is kept, in seconds.
    SECONDS = 60.0

    def __init__(self) -> None:
        self._records: dict[str, tuple[ApiKey, float]] = {}
        #: Moves with every change heard: a read that began before one is not kept.
        self.generation = 0
        #: The ``keys-changed`` subscription is confirmed and unbroken.
        self.heard = False
        #: Reads in flight by key hash, and the generation each began in.
        self.reading: dict[str, tuple[int, asyncio.Future[ApiKey | None]]] = {}

    def get(self, key_hash: str) -> ApiKey | None:
        found = self._records.get(key_hash)
        if found is None or not self.heard or found[1] < time.monotonic():
            return None
        return found[0]

    def put(self, key_hash: str, record: ApiKey, generation: int) -> None:
        """Keep `record`, read after `generation` was current, if nothing changed since."""
        if record.credits is None and self.heard and generation == self.generation:
            if len(self._records) > 10_000:
                self._records.clear()
            self._records[key_hash] = (record, time.monotonic() + self.SECONDS)

    def changed(self) -> None:
        """A key record changed (or a change may have been missed): keep nothing read before."""
        self.generation += 1
        self._records.clear()

    def listening(self, heard: bool) -> None:
        self.heard = heard
        if not heard:
            self.changed()


class RedisApiKeys:
    """The key and credit methods of `JobStore` for `RedisStore`."""

    if TYPE_CHECKING:
        keys: Keys
        _key_cache: KeyCache

        async def _call(self, script: str, *args: str | int | float | bytes, now: float | None = None) -> Any: ...
        async def _conn(self) -> Redis: ...
        async def _listen(self, channel: str, *, pattern: bool) -> None: ...

    async def add_key(self, key: ApiKey) -> None:
        fields: list[str] = ["id", key.id, "name", key.name, "prefix", key.prefix, "key_hash", key.key_hash,
                             "admin", encode(key.admin), "enabled", encode(key.enabled),
                             "created_at", repr(float(key.created_at))]
        exact = None if key.credits is None else credits_of(micro(key.credits))
        for name, value in (("credits", exact), ("rate_limit", key.rate_limit),
                            ("max_concurrency", key.max_concurrency), ("weight", float(key.weight))):
            if value is not None:
                fields += [name, encode(value)]
        credits = repr(exact) if exact is not None else ""
        if not await self._call(names.SCRIPT_ADD_KEY, key.id, key.key_hash, repr(float(key.created_at)),
                                credits, *fields):
            raise AlreadyExists(f"key {key.id} already exists")

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        cache = self._key_cache
        if (record := cache.get(key_hash)) is not None:
            return record
        if not cache.heard:
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # (then nothing is kept)
                await self._listen(self.keys.keys_changed, pattern=False)
        # lookups of one key at once share one read, unless a change was heard since it began
        generation = cache.generation
        reading = cache.reading.get(key_hash)
        if reading is None or reading[0] != generation:
            reading = (generation, asyncio.ensure_future(self._read_key(key_hash, generation)))
            cache.reading[key_hash] = reading
            reading[1].add_done_callback(lambda _: cache.reading.pop(key_hash, None)
                                         if cache.reading.get(key_hash) is reading else None)
        return await asyncio.shield(reading[1])

    async def _read_key(self, key_hash: str, generation: int) -> ApiKey | None:
        raw = flat_hash(await self._call(names.SCRIPT_KEY_BY_HASH, key_hash))  # one round trip
        record = key_of(raw) if raw else None
        if record is not None:
            self._key_cache.put(key_hash, record, generation)
        return record

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = hash_of(await (await self._conn()).hgetall(self.keys.key(key_id)))
        return key_of(raw) if raw else None

    async def list_keys(self) -> list[ApiKey]:
        r = await self._conn()
        ids = await r.zrange(self.keys.key_list, 0, -1)
        async with r.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self.keys.key(str_of(key_id)))
            hashes = await pipe.execute()
        return [key_of(raw) for raw in map(hash_of, hashes) if raw]

    async def update_key(self, key_id: str, **changes: Any) -> ApiKey | None:
        sets: list[str] = []
        deletes: list[str] = []
        for name in KEY_FIELDS:
            if name in changes:
                if changes[name] is None:
                    deletes.append(name)
                else:
                    sets += [name, encode(changes[name])]
        mode, value = "", ""
        if "credits" in changes:
            mode = "set"
            value = "" if changes["credits"] is None else repr(float(changes["credits"]))
        elif "add_credits" in changes:
            mode, value = "add", repr(float(changes["add_credits"]))
        self._key_cache.changed()
        got = await self._call(names.SCRIPT_UPDATE_KEY, key_id, mode, value, len(sets) // 2, *sets, *deletes)
        status = str_of(got[0])
        if status == "range":
            raise BalanceOutOfRange(float(got[1]))
        return key_of(flat_hash(got[1:])) if status == "ok" else None

    async def delete_key(self, key_id: str) -> bool:
        self._key_cache.changed()
        return bool(await self._call(names.SCRIPT_DELETE_KEY, key_id))

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        rows = await (await self._conn()).lrange(self.keys.ledger(key_id), 0, -1)
        return [LedgerEntry(key_id=key_id, request_id=e["request_id"], kind=e["kind"], amount=float(e["amount"]),
                            at=float(e["at"])) for e in map(json.loads, rows)]

    async def running_count(self, key_id: str) -> int:
        return int(await self._call(names.SCRIPT_RUNNING, key_id))
