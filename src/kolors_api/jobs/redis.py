"""Redis backend of the job store: the fleet mode, shared by stateless API replicas and GPU workers.

- The queue is one stream with one consumer group; each worker is a consumer named by its id.
  `claim` first takes, with XAUTOCLAIM, entries whose lease ran out (a dead worker's), then blocks
  in XREADGROUP (on connections of their own, so blocking reads never starve the pool).
- A lease lives in the job hash (`lease_token`, `lease_until`, `deliveries`). So that XAUTOCLAIM
  with one fixed min-idle (the horizon, 60 s) finds exactly the entries whose lease ran out,
  whatever each lease's length, every claim and heartbeat sets the entry's idle time to
  `horizon - lease` (XCLAIM … IDLE … JUSTID by the holder). The hash stays the authority: an
  entry XAUTOCLAIM hands over whose lease still runs goes back to its holder untouched.
- Every write of a worker (progress, heartbeat, complete, fail) is a Lua script that checks
  state == PROCESSING and lease_token == the lease's token first: a stale worker changes nothing.
  Every state change is one script, so counters, credits and the ledger move with it or not at all.
- Job hashes and images get a TTL (retention) when the job finishes, never before.
- `wait` is woken by pub/sub (every change publishes the job's version on its channel; one
  pattern subscription per store), with a re-check every second as a fallback.
- Timestamps written by the scripts come from the Redis server's clock, the one clock of the fleet.

Not for Redis Cluster: the scripts touch keys they discover at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import (
    ApiKey,
    InsufficientFunds,
    Job,
    JobState,
    Lease,
    LedgerEntry,
    NewJob,
    QueueFull,
    StoreStats,
    TooManyRunning,
)
from kolors_api.jobs.redis_keys import Keys

log = logging.getLogger(__name__)

_KEY_FIELDS = ("name", "enabled", "admin", "rate_limit", "max_concurrency")

# ARGV[1] is the prefix (see redis_keys.LUA_KEYS), ARGV[2] the retention in seconds; a script's own
# arguments start at ARGV[3].
_LUA_COMMON = r"""
local RETENTION = tonumber(ARGV[2])
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
local function with_status(status, list)
  table.insert(list, 1, status)
  return list
end
local function publish(id)
  redis.call('PUBLISH', k_events(id), redis.call('HGET', k_job(id), 'version') or '0')
end
local function ledger(kid, rid, kind, amount, at)
  redis.call('RPUSH', k_ledger(kid),
    cjson.encode({request_id = rid, kind = kind, amount = num(amount), at = num(at)}))
end
local function ack(entry)
  if entry then
    redis.call('XACK', K_STREAM, K_GROUP, entry)
    redis.call('XDEL', K_STREAM, entry)
  end
end
-- the idle time that makes an entry reach the horizon when `remaining_ms` have passed
local function idle_for(remaining_ms, horizon)
  return math.max(0, math.floor(horizon - remaining_ms))
end
-- COMPLETED or FAILED: leave the queue, release the key's slot, ack the entry, start the TTL
local function finish(id, fields, t)
  local jk = k_job(id)
  local h = redis.call('HMGET', jk, 'state', 'key_id', 'entry')
  local exp = t + RETENTION
  redis.call('HSET', jk, 'finished_at', num(t), 'expires_at', num(exp), unpack(fields))
  redis.call('HDEL', jk, 'lease_token', 'lease_until', 'lease_ms')
  redis.call('HINCRBY', jk, 'version', 1)
  if h[1] == 'QUEUED' then redis.call('ZREM', K_QUEUED, id) else redis.call('SREM', K_PROCESSING, id) end
  if h[2] and redis.call('DECR', k_running(h[2])) <= 0 then redis.call('DEL', k_running(h[2])) end
  ack(h[3])
  local at_ms = math.ceil(exp * 1000)
  redis.call('PEXPIREAT', jk, at_ms)
  redis.call('ZADD', K_EXPIRING, num(exp), cjson.encode({id, h[2] or ''}))
  return at_ms
end
local function fail_job(id, err, t)
  local h = redis.call('HMGET', k_job(id), 'key_id', 'cost', 'reserved')
  finish(id, {'state', 'FAILED', 'error', err}, t)
  local kid, cost = h[1], tonumber(h[2] or '0')
  if kid and cost ~= 0 and h[3] == '1' then
    local credits = redis.call('HGET', k_key(kid), 'credits')
    if credits then redis.call('HSET', k_key(kid), 'credits', num(tonumber(credits) + cost)) end
    ledger(kid, id, 'refund', cost, t)
  end
  publish(id)
end
local function take(id, entry, worker, token, lease_ms, horizon, t)
  local jk = k_job(id)
  if redis.call('HGET', jk, 'state') == 'QUEUED' then
    redis.call('ZREM', K_QUEUED, id)
    redis.call('SADD', K_PROCESSING, id)
  end
  redis.call('HSET', jk, 'state', 'PROCESSING', 'lease_token', token, 'lease_worker', worker,
    'lease_until', num(t + lease_ms / 1000), 'lease_ms', num(lease_ms), 'started_at', num(t), 'step', 0)
  redis.call('HINCRBY', jk, 'deliveries', 1)
  redis.call('HINCRBY', jk, 'version', 1)
  redis.call('XCLAIM', K_STREAM, K_GROUP, worker, 0, entry, 'IDLE', idle_for(lease_ms, horizon), 'JUSTID')
  publish(id)
  return with_status('ok', redis.call('HGETALL', jk))
end
"""

_LUA_BODIES: dict[str, str] = {
    # ARGV: id, queue_cap, key_id or '', cost, model, params, idempotency_key, webhook
    names.SCRIPT_SUBMIT: r"""
local id, kid, cost = ARGV[3], ARGV[5], tonumber(ARGV[6])
local jk = k_job(id)
if redis.call('EXISTS', jk) == 1 then return {'exists'} end
local cap = tonumber(ARGV[4])
if cap > 0 then
  local queued = redis.call('ZCARD', K_QUEUED)
  if queued >= cap then return {'queue_full', queued} end
end
local t = now()
local reserved = '0'
if kid ~= '' then
  local key = redis.call('HMGET', k_key(kid), 'credits', 'max_concurrency')
  if key[2] and tonumber(redis.call('GET', k_running(kid)) or '0') >= tonumber(key[2]) then
    return {'too_many', key[2]}
  end
  if key[1] then
    local have = tonumber(key[1])
    if have + 1e-9 < cost then return {'funds', num(cost), num(have)} end
    redis.call('HSET', k_key(kid), 'credits', num(have - cost))
  end
  -- unlimited keys get the entry too (their usage), without a balance to move
  ledger(kid, id, 'reserve', -cost, t)
  reserved = '1'
end
if redis.call('EXISTS', K_STREAM) == 0 then
  redis.call('XGROUP', 'CREATE', K_STREAM, K_GROUP, '0', 'MKSTREAM')
end
local seq = redis.call('INCR', K_SEQ)
local entry = redis.call('XADD', K_STREAM, '*', 'job', id)
redis.call('HSET', jk, 'id', id, 'model', ARGV[7], 'params', ARGV[8], 'state', 'QUEUED', 'cost', ARGV[6],
  'created_at', num(t), 'step', 0, 'total_steps', 0, 'outputs', 0, 'ext', '', 'seeds', '[]',
  'metrics', '{}', 'deliveries', 0, 'cancel_requested', 0, 'version', 1, 'seq', seq, 'entry', entry,
  'reserved', reserved)
if kid ~= '' then
  redis.call('HSET', jk, 'key_id', kid)
  redis.call('INCR', k_running(kid))
  redis.call('ZADD', k_history(kid), seq, id)
end
if ARGV[9] ~= '' then redis.call('HSET', jk, 'idempotency_key', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', jk, 'webhook', ARGV[10]) end
redis.call('ZADD', K_QUEUED, seq, id)
return with_status('ok', redis.call('HGETALL', jk))
""",
    # ARGV: worker, token, lease_ms, horizon_ms, max_deliveries
    names.SCRIPT_CLAIM_STALE: r"""
if redis.call('EXISTS', K_STREAM) == 0 then return {'none'} end
local worker, token, lease_ms, horizon = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local max_deliveries = tonumber(ARGV[7])
local t = now()
local cursor = '0-0'
for _ = 1, 1000 do
  local r = redis.call('XAUTOCLAIM', K_STREAM, K_GROUP, worker, horizon, cursor, 'COUNT', 1)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    if type(e) == 'table' then
      local entry, id = e[1], e[2][2]
      local h = redis.call('HMGET', k_job(id), 'state', 'lease_until', 'lease_worker', 'deliveries')
      if h[1] == 'PROCESSING' and h[2] and tonumber(h[2]) > t then
        -- its lease still runs (one longer than the horizon): back to its holder, idle restored
        redis.call('XCLAIM', K_STREAM, K_GROUP, h[3], 0, entry,
          'IDLE', idle_for((tonumber(h[2]) - t) * 1000, horizon), 'JUSTID')
      elseif h[1] == 'PROCESSING' or h[1] == 'QUEUED' then
        -- QUEUED here: read by a worker that died before its claim script ran
        if h[1] == 'PROCESSING' then redis.call('HINCRBY', K_COUNTERS, F_RECLAIMS, 1) end
        local deliveries = tonumber(h[4])
        if deliveries >= max_deliveries then
          local reason = 'worker lost ' .. deliveries .. ' times'
          fail_job(id, reason, t)
          redis.call('XADD', K_DEAD, 'MAXLEN', '~', 10000, '*', 'job', id, 'reason', reason, 'at', num(t))
          redis.call('HINCRBY', K_COUNTERS, F_DEAD, 1)
        else
          return take(id, entry, worker, token, lease_ms, horizon, t)
        end
      else
        ack(entry)  -- the job ended or went: nothing to deliver
      end
    end
  end
  if cursor == '0-0' then break end
end
return {'none'}
""",
    # ARGV: worker, token, lease_ms, horizon_ms, entry, job id
    names.SCRIPT_CLAIM_ENTRY: r"""
local entry, id = ARGV[7], ARGV[8]
if redis.call('HGET', k_job(id), 'state') ~= 'QUEUED' then
  ack(entry)  -- cancelled (or gone) after it was queued
  return {'none'}
end
return take(id, entry, ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), now())
""",
    # ARGV: id, token, lease_ms, horizon_ms
    names.SCRIPT_HEARTBEAT: r"""
local jk, lease_ms = k_job(ARGV[3]), tonumber(ARGV[5])
local h = redis.call('HMGET', jk, 'state', 'lease_token', 'lease_worker', 'entry')
if h[1] ~= 'PROCESSING' or h[2] ~= ARGV[4] then return 0 end
redis.call('HSET', jk, 'lease_until', num(now() + lease_ms / 1000), 'lease_ms', num(lease_ms))
redis.call('XCLAIM', K_STREAM, K_GROUP, h[3], 0, h[4], 'IDLE', idle_for(lease_ms, tonumber(ARGV[6])),
  'JUSTID')
return 1
""",
    # ARGV: id, token, step, total_steps
    names.SCRIPT_PROGRESS: r"""
local jk = k_job(ARGV[3])
local h = redis.call('HMGET', jk, 'state', 'lease_token')
if h[1] ~= 'PROCESSING' or h[2] ~= ARGV[4] then return 0 end
redis.call('HSET', jk, 'step', ARGV[5], 'total_steps', ARGV[6])
redis.call('HINCRBY', jk, 'version', 1)
publish(ARGV[3])
return 1
""",
    # ARGV: id, token, ext, seeds, metrics, blob dir name or '', n, image 0 … image n-1 (when no blob)
    names.SCRIPT_COMPLETE: r"""
local id = ARGV[3]
local h = redis.call('HMGET', k_job(id), 'state', 'lease_token', 'key_id', 'cost', 'total_steps')
if h[1] ~= 'PROCESSING' or h[2] ~= ARGV[4] then return 0 end
local t, n = now(), tonumber(ARGV[9])
local fields = {'state', 'COMPLETED', 'outputs', n, 'ext', ARGV[5], 'seeds', ARGV[6], 'metrics', ARGV[7],
  'step', h[5] or '0'}
if ARGV[8] ~= '' then
  table.insert(fields, 'blob')
  table.insert(fields, ARGV[8])
end
local at_ms = finish(id, fields, t)
if ARGV[8] == '' then
  for i = 1, n do redis.call('SET', k_output(id, i - 1), ARGV[9 + i], 'PXAT', at_ms) end
end
if h[3] and tonumber(h[4] or '0') ~= 0 then ledger(h[3], id, 'capture', 0, t) end
publish(id)
return 1
""",
    # ARGV: id, token, error
    names.SCRIPT_FAIL: r"""
local h = redis.call('HMGET', k_job(ARGV[3]), 'state', 'lease_token')
if h[1] ~= 'PROCESSING' or h[2] ~= ARGV[4] then return 0 end
fail_job(ARGV[3], ARGV[5], now())
return 1
""",
    # ARGV: id
    names.SCRIPT_CANCEL: r"""
local id = ARGV[3]
local jk = k_job(id)
local state = redis.call('HGET', jk, 'state')
if not state then return {'none'} end
if state == 'QUEUED' then
  fail_job(id, 'cancelled', now())
elseif state == 'PROCESSING' then
  redis.call('HSET', jk, 'cancel_requested', 1)
  redis.call('HINCRBY', jk, 'version', 1)
  publish(id)
end
return with_status('ok', redis.call('HGETALL', jk))
""",
    # ARGV: batch size. Returns the ids of the jobs that went.
    names.SCRIPT_EXPIRE: r"""
local t = now()
local gone = {}
local due = redis.call('ZRANGEBYSCORE', K_EXPIRING, '-inf', num(t), 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local pair = cjson.decode(member)
  local id, kid = pair[1], pair[2]
  local outputs = tonumber(redis.call('HGET', k_job(id), 'outputs') or '0')
  for i = 1, outputs do redis.call('DEL', k_output(id, i - 1)) end
  redis.call('DEL', k_job(id))
  if kid ~= '' then redis.call('ZREM', k_history(kid), id) end
  redis.call('ZREM', K_EXPIRING, member)
  table.insert(gone, id)
end
redis.call('ZREMRANGEBYSCORE', K_WORKERS, '-inf', num(t - 3600))
return gone
""",
    # ARGV: id, key_hash, created_at, credits or '', then field/value pairs
    names.SCRIPT_ADD_KEY: r"""
local id = ARGV[3]
if redis.call('EXISTS', k_key(id)) == 1 or redis.call('HEXISTS', K_KEY_INDEX, ARGV[4]) == 1 then return 0 end
redis.call('HSET', k_key(id), unpack(ARGV, 7))
redis.call('HSET', K_KEY_INDEX, ARGV[4], id)
redis.call('ZADD', K_KEY_LIST, ARGV[5], id)
if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= 0 then ledger(id, '', 'topup', tonumber(ARGV[6]), now()) end
return 1
""",
    # ARGV: id, credits mode ('', 'set' or 'add'), credits value ('' = None), n sets, n field/value pairs,
    # then the fields to delete
    names.SCRIPT_UPDATE_KEY: r"""
local kk = k_key(ARGV[3])
if redis.call('EXISTS', kk) == 0 then return {} end
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', kk, ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', kk, ARGV[i])
  i = i + 1
end
if ARGV[4] ~= '' then
  local old = tonumber(redis.call('HGET', kk, 'credits') or '0')
  local new = nil
  if ARGV[4] == 'add' then new = old + tonumber(ARGV[5]) elseif ARGV[5] ~= '' then new = tonumber(ARGV[5]) end
  if new == nil then
    redis.call('HDEL', kk, 'credits')
  else
    redis.call('HSET', kk, 'credits', num(new))
    ledger(ARGV[3], '', 'topup', new - old, now())
  end
end
return redis.call('HGETALL', kk)
""",
    # ARGV: id
    names.SCRIPT_DELETE_KEY: r"""
local kk = k_key(ARGV[3])
local key_hash = redis.call('HGET', kk, 'key_hash')
if not key_hash then return 0 end
redis.call('DEL', kk)
redis.call('HDEL', K_KEY_INDEX, key_hash)
redis.call('ZREM', K_KEY_LIST, ARGV[3])
return 1
""",
    # ARGV: worker id, ttl seconds
    names.SCRIPT_WORKER_ALIVE: r"""
local ttl = tonumber(ARGV[4])
if ttl <= 0 then return redis.call('ZREM', K_WORKERS, ARGV[3]) end
return redis.call('ZADD', K_WORKERS, num(now() + ttl), ARGV[3])
""",
    names.SCRIPT_STATS: r"""
local counters = redis.call('HMGET', K_COUNTERS, F_RECLAIMS, F_DEAD)
return {redis.call('ZCARD', K_QUEUED), redis.call('SCARD', K_PROCESSING),
  redis.call('ZCOUNT', K_WORKERS, '(' .. num(now()), '+inf'),
  tonumber(counters[1] or '0'), tonumber(counters[2] or '0')}
""",
}

_SCRIPTS = {name: names.LUA_KEYS + _LUA_COMMON + body for name, body in _LUA_BODIES.items()}
assert set(_SCRIPTS) == set(names.SCRIPT_NAMES)


class RedisStore:
    """The fleet store. `blob_dir` (a directory every worker and API replica shares) keeps images as
    files instead of in Redis."""

    #: Fallback re-check of `wait` and longest single block of `claim`, in seconds.
    recheck: float = 1.0
    #: XAUTOCLAIM's min-idle: also how long an entry read by a worker that died before recording
    #: its claim waits to be handed out again.
    reclaim_horizon: float = 60.0

    def __init__(self, url: str, *, retention: float = 3600.0, max_deliveries: int = 3,
                 blob_dir: Path | None = None, prefix: str = names.DEFAULT_PREFIX) -> None:
        self.url = url
        self.retention = retention
        self.max_deliveries = max_deliveries
        self.blob_dir = Path(blob_dir) if blob_dir is not None else None
        self.keys = Keys(prefix)
        self._redis: Redis | None = None
        self._blocking: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}

    # -- plumbing
    async def open(self) -> None:
        if self._redis is not None:
            return
        self._redis = Redis.from_url(self.url)
        # Blocking reads get connections of their own, so they never hold the main pool's.
        self._blocking = Redis.from_url(self.url)
        self._scripts = {name: self._redis.register_script(src) for name, src in _SCRIPTS.items()}
        await self._ensure_group()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None
        for client in (self._blocking, self._redis):
            if client is not None:
                await client.aclose()
        self._redis = self._blocking = None

    async def _conn(self) -> Redis:
        if self._redis is None:
            await self.open()
        assert self._redis is not None
        return self._redis

    async def _call(self, script: str, *args: str | int | float | bytes) -> Any:
        await self._conn()
        return await self._scripts[script](args=[self.keys.prefix, repr(float(self.retention)), *args])

    async def _ensure_group(self) -> None:
        try:
            await (await self._conn()).xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def ping(self) -> bool:
        try:
            return bool(await (await self._conn()).ping())
        except (RedisError, OSError):
            return False

    async def delete_everything(self) -> None:
        """Delete every key under this store's prefix (tests; tearing a deployment down)."""
        r = await self._conn()
        found = [key async for key in r.scan_iter(match=self.keys.everything, count=500)]
        for i in range(0, len(found), 500):
            await r.unlink(*found[i:i + 500])

    async def shared_secret(self) -> bytes:
        r = await self._conn()
        await r.set(self.keys.secret, secrets.token_bytes(32), nx=True)
        secret = await r.get(self.keys.secret)
        assert isinstance(secret, bytes)
        return secret

    # -- jobs: API side
    async def submit(self, new: NewJob, *, queue_cap: int = 0) -> Job:
        got = await self._call(names.SCRIPT_SUBMIT, new.id, int(queue_cap), new.key_id or "",
                               repr(float(new.cost)), new.model, json.dumps(new.params),
                               new.idempotency_key or "", new.webhook or "")
        status = _str(got[0])
        if status == "queue_full":
            raise QueueFull(f"queue is full ({int(got[1])} jobs waiting)")
        if status == "too_many":
            raise TooManyRunning(int(got[1]))
        if status == "funds":
            raise InsufficientFunds(float(got[1]), float(got[2]))
        if status == "exists":
            raise ValueError(f"job {new.id} already exists")
        return _job(_hash(got[1:]))

    async def get(self, job_id: str) -> Job | None:
        raw = await (await self._conn()).hgetall(self.keys.job(job_id))
        return _live(_hash_of(raw))

    async def queue_position(self, job_id: str) -> int | None:
        rank: Any = await (await self._conn()).zrank(self.keys.queued, job_id)
        return None if rank is None else int(rank)

    async def wait(self, job_id: str, after_version: int, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        await self._listen()
        ev = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(ev)
        try:
            while True:
                ev.clear()  # before reading, so a change published meanwhile still wakes us
                job = await self.get(job_id)
                left = deadline - time.monotonic()
                if job is None or job.version > after_version or left <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(left, self.recheck))
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[job_id]

    async def _listen(self) -> None:
        """Start this store's one pattern subscription to every job's channel (once)."""
        if self._listener is not None:
            return
        async with self._listen_lock:
            if self._listener is not None:
                return
            pubsub = (await self._conn()).pubsub()
            await pubsub.psubscribe(self.keys.events_pattern)
            # From the confirmation on, no publication can be missed.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None and _str(msg["type"]) == "psubscribe":
                    break
            self._pubsub = pubsub
            self._listener = asyncio.create_task(self._dispatch(pubsub))

    async def _dispatch(self, pubsub: PubSub) -> None:
        while True:
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as exc:  # the fallback re-check covers the gap
                log.warning("job events subscription: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if msg is None or _str(msg["type"]) != "pmessage":
                continue
            job_id = self.keys.job_id_of_channel(_str(msg["channel"]))
            for ev in self._waiters.get(job_id or "", ()):
                ev.set()

    async def read_output(self, job_id: str, index: int) -> bytes | None:
        r = await self._conn()
        raw = _hash_of(await r.hgetall(self.keys.job(job_id)))
        job = _live(raw)
        if job is None or job.state != JobState.COMPLETED or not 0 <= index < job.outputs:
            return None
        if "blob" not in raw:
            data = await r.get(self.keys.output(job_id, index))
            return data if isinstance(data, bytes) else None
        if self.blob_dir is None:
            return None
        path = self.blob_dir / job_id / raw["blob"] / f"{index}.{job.ext}"
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def request_cancel(self, job_id: str) -> Job | None:
        got = await self._call(names.SCRIPT_CANCEL, job_id)
        return _live(_hash(got[1:])) if _str(got[0]) == "ok" else None

    async def history(self, key_id: str, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        r = await self._conn()
        before = f"({int(cursor)}" if cursor and cursor.isdigit() else "+inf"
        page: list[tuple[Job, int]] = []
        more = False
        while not more:
            rows: Any = await r.zrevrangebyscore(self.keys.history(key_id), before, "-inf", start=0,
                                            num=limit + 1, withscores=True)
            if not rows:
                break
            async with r.pipeline(transaction=False) as pipe:
                for member, _ in rows:
                    pipe.hgetall(self.keys.job(_str(member)))
                hashes = await pipe.execute()
            for (_, score), raw in zip(rows, hashes, strict=True):
                before = f"({int(score)}"
                job = _live(_hash_of(raw))
                if job is None:
                    continue  # expired, not yet swept by expire()
                if len(page) == limit:
                    more = True
                    break
                page.append((job, int(score)))
            if len(rows) < limit + 1:
                break
        return [job for job, _ in page], (str(page[-1][1]) if more and page else None)

    # -- jobs: worker side
    async def claim(self, worker_id: str, lease_seconds: float, timeout: float) -> Lease | None:
        deadline = time.monotonic() + timeout
        lease_ms, horizon_ms = repr(lease_seconds * 1000.0), int(self.reclaim_horizon * 1000)
        while True:
            token = uuid.uuid4().hex
            got = await self._call(names.SCRIPT_CLAIM_STALE, worker_id, token, lease_ms, horizon_ms,
                                   self.max_deliveries)
            if _str(got[0]) == "ok":
                return _lease(got, token, worker_id)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for entry, job_id in await self._read_new(worker_id, min(left, self.recheck)):
                got = await self._call(names.SCRIPT_CLAIM_ENTRY, worker_id, token, lease_ms, horizon_ms,
                                       entry, job_id)
                if _str(got[0]) == "ok":
                    return _lease(got, token, worker_id)

    async def _read_new(self, worker_id: str, wait: float) -> list[tuple[str, str]]:
        """XREADGROUP … BLOCK for one new entry: [(entry id, job id)] or []."""
        await self._conn()
        assert self._blocking is not None
        try:
            resp: Any = await self._blocking.xreadgroup(self.keys.group, worker_id, {self.keys.stream: ">"},
                                                   count=1, block=max(1, int(wait * 1000)))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()  # the stream was deleted under us
            return []
        out: list[tuple[str, str]] = []
        for _stream, entries in resp or []:
            for entry, fields in entries:
                job_id = fields.get(b"job") if isinstance(fields, dict) else None
                if job_id is not None:
                    out.append((_str(entry), _str(job_id)))
        return out

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        return bool(await self._call(names.SCRIPT_HEARTBEAT, lease.job.id, lease.token,
                                     repr(lease_seconds * 1000.0), int(self.reclaim_horizon * 1000)))

    async def progress(self, lease: Lease, step: int, total_steps: int) -> bool:
        return bool(await self._call(names.SCRIPT_PROGRESS, lease.job.id, lease.token, int(step),
                                     int(total_steps)))

    async def complete(self, lease: Lease, images: list[bytes], ext: str, seeds: list[int],
                       metrics: dict[str, float]) -> bool:
        r = await self._conn()
        state, token = await r.hmget(self.keys.job(lease.job.id), ["state", "lease_token"])
        if state != b"PROCESSING" or token != lease.token.encode():
            return False  # already stale: do not even write the images
        blob = ""
        payload: list[bytes] = images
        if self.blob_dir is not None:
            # The files go to a folder of this lease, complete before the fenced commit points the
            # record at it; a stale commit removes its folder again.
            blob, payload = lease.token, []
            await asyncio.to_thread(self._write_blobs, lease.job.id, lease.token, images, ext)
        ok = bool(await self._call(names.SCRIPT_COMPLETE, lease.job.id, lease.token, ext, json.dumps(seeds),
                                   json.dumps(metrics), blob, len(images), *payload))
        if not ok and self.blob_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.blob_dir / lease.job.id / lease.token, True)
        return ok

    def _write_blobs(self, job_id: str, token: str, images: list[bytes], ext: str) -> None:
        assert self.blob_dir is not None
        tmp = self.blob_dir / job_id / f".{token}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(images):
            (tmp / f"{i}.{ext}").write_bytes(data)
        os.replace(tmp, self.blob_dir / job_id / token)

    async def fail(self, lease: Lease, error: str) -> bool:
        return bool(await self._call(names.SCRIPT_FAIL, lease.job.id, lease.token, error))

    async def worker_alive(self, worker_id: str, ttl: float) -> None:
        await self._call(names.SCRIPT_WORKER_ALIVE, worker_id, repr(float(ttl)))

    async def stats(self) -> StoreStats:
        queued, processing, alive, reclaims, dead = await self._call(names.SCRIPT_STATS)
        return StoreStats(queued=int(queued), processing=int(processing), workers_alive=int(alive),
                          reclaims=int(reclaims), dead_letters=int(dead))

    async def expire(self) -> int:
        batch, total = 500, 0
        while True:
            gone = [_str(job_id) for job_id in await self._call(names.SCRIPT_EXPIRE, batch)]
            total += len(gone)
            if self.blob_dir is not None:
                for job_id in gone:
                    await asyncio.to_thread(shutil.rmtree, self.blob_dir / job_id, True)
            if len(gone) < batch:
                break
        # Consumers are per worker id: forget those long gone that hold nothing.
        r = await self._conn()
        with contextlib.suppress(ResponseError):
            for consumer in await r.xinfo_consumers(self.keys.stream, self.keys.group):
                if consumer["pending"] == 0 and consumer["idle"] > 3_600_000:
                    await r.xgroup_delconsumer(self.keys.stream, self.keys.group, consumer["name"])
        return total

    # -- keys and credits
    async def add_key(self, key: ApiKey) -> None:
        fields: list[str] = ["id", key.id, "name", key.name, "prefix", key.prefix, "key_hash", key.key_hash,
                             "admin", _encode(key.admin), "enabled", _encode(key.enabled),
                             "created_at", repr(float(key.created_at))]
        for name, value in (("credits", key.credits), ("rate_limit", key.rate_limit),
                            ("max_concurrency", key.max_concurrency)):
            if value is not None:
                fields += [name, _encode(value)]
        credits = repr(float(key.credits)) if key.credits is not None else ""
        if not await self._call(names.SCRIPT_ADD_KEY, key.id, key.key_hash, repr(float(key.created_at)),
                                credits, *fields):
            raise ValueError(f"key {key.id} already exists")

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        key_id = await (await self._conn()).hget(self.keys.key_index, key_hash)
        return None if key_id is None else await self.get_key(_str(key_id))

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = _hash_of(await (await self._conn()).hgetall(self.keys.key(key_id)))
        return _key(raw) if raw else None

    async def list_keys(self) -> list[ApiKey]:
        r = await self._conn()
        ids = await r.zrange(self.keys.key_list, 0, -1)
        async with r.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self.keys.key(_str(key_id)))
            hashes = await pipe.execute()
        return [_key(raw) for raw in map(_hash_of, hashes) if raw]

    async def update_key(self, key_id: str, **changes: Any) -> ApiKey | None:
        sets: list[str] = []
        deletes: list[str] = []
        for name in _KEY_FIELDS:
            if name in changes:
                if changes[name] is None:
                    deletes.append(name)
                else:
                    sets += [name, _encode(changes[name])]
        mode, value = "", ""
        if "credits" in changes:
            mode = "set"
            value = "" if changes["credits"] is None else repr(float(changes["credits"]))
        elif "add_credits" in changes:
            mode, value = "add", repr(float(changes["add_credits"]))
        got = await self._call(names.SCRIPT_UPDATE_KEY, key_id, mode, value, len(sets) // 2, *sets, *deletes)
        return _key(_hash(got)) if got else None

    async def delete_key(self, key_id: str) -> bool:
        return bool(await self._call(names.SCRIPT_DELETE_KEY, key_id))

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        rows = await (await self._conn()).lrange(self.keys.ledger(key_id), 0, -1)
        return [LedgerEntry(key_id=key_id, request_id=e["request_id"], kind=e["kind"], amount=float(e["amount"]),
                            at=float(e["at"])) for e in map(json.loads, rows)]

    async def running_count(self, key_id: str) -> int:
        count = await (await self._conn()).get(self.keys.running(key_id))
        return int(count) if count is not None else 0


# -- decoding what Redis hands back
def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(flat: list[Any]) -> dict[str, str]:
    """A flat [field, value, …] list (HGETALL inside a script) as a dict."""
    return {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _hash_of(raw: dict[Any, Any]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in raw.items()}


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _opt_float(value: str | None) -> float | None:
    return float(value) if value else None


def _job(h: dict[str, str]) -> Job:
    return Job(
        id=h["id"], model=h["model"], params=json.loads(h["params"]), state=JobState(h["state"]),
        created_at=float(h["created_at"]), key_id=h.get("key_id"), cost=float(h["cost"]),
        started_at=_opt_float(h.get("started_at")), finished_at=_opt_float(h.get("finished_at")),
        step=int(h["step"]), total_steps=int(h["total_steps"]), error=h.get("error"),
        outputs=int(h["outputs"]), ext=h["ext"], seeds=json.loads(h["seeds"]),
        metrics=json.loads(h["metrics"]),
        deliveries=int(h["deliveries"]), cancel_requested=h["cancel_requested"] == "1",
        version=int(h["version"]), expires_at=float(h.get("expires_at") or 0.0),
    )


def _live(h: dict[str, str]) -> Job | None:
    """The job of a hash, or None when there is none. Past retention there is none: Redis never
    answers a key past its TTL, and the TTL is set from the same (server) clock as `expires_at`."""
    return _job(h) if "id" in h else None


def _lease(got: list[Any], token: str, worker_id: str) -> Lease:
    job = _job(_hash(got[1:]))
    return Lease(job=job, token=token, worker_id=worker_id, delivery=job.deliveries)


def _key(h: dict[str, str]) -> ApiKey:
    return ApiKey(id=h["id"], name=h["name"], prefix=h["prefix"], key_hash=h["key_hash"],
                  admin=h.get("admin") == "1", enabled=h.get("enabled", "1") == "1",
                  credits=_opt_float(h.get("credits")), rate_limit=h.get("rate_limit"),
                  max_concurrency=int(h["max_concurrency"]) if h.get("max_concurrency") else None,
                  created_at=float(h.get("created_at") or 0.0))
