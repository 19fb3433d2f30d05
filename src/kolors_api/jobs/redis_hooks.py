"""The Redis store's webhook outbox (a mixin of `RedisStore`) and its Lua.

`LUA_OUTBOX` is part of every script's common helpers: the scripts that change a job (claim, progress,
complete, fail, cancel) call `outbox(id, event, t)` in the same atomic step, so a delivery exists
exactly when its change does, whatever process dies after. Deliveries wait per destination
(`base.destination`: host and port) in ``hooks-due:{destination}``, scored by when they are due, and
the destinations in ``hook-dests`` by their earliest; a claim visits the destinations that have
something due (O(destinations), never the whole backlog), so one that hangs holds no other's turn.
A claim pushes a delivery one lease ahead and sets a token, so a runner that dies mid-attempt leaves
a delivery that is due again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import (
    CLAIM_LOOKAHEAD,
    WEBHOOK_LOG_SECONDS,
    WebhookAttempt,
    WebhookDelivery,
    new_webhook_secret,
)

#: The longest an idle delivery runner waits without looking (a missed publication's bound).
HOOKS_IDLE = 5.0

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from kolors_api.jobs.redis_keys import Keys

LUA_OUTBOX = f"""
local HOOK_TTL = {WEBHOOK_LOG_SECONDS}
""" + r"""
-- base.destination: host and port as written, lower case, without user info
local function destination(url)
  local rest = string.match(url, '^[^:/?#]*://(.*)$') or url
  rest = string.match(rest, '^[^/?#]*')
  return string.lower(string.match(rest, '([^@]*)$'))
end
-- (re)schedule a delivery in its destination's queue; the destination's place follows its earliest
local function hook_due(did, dest, at)
  redis.call('ZADD', k_dest_due(dest), at, did)
  local first = redis.call('ZRANGE', k_dest_due(dest), 0, 0, 'WITHSCORES')
  redis.call('ZADD', K_HOOK_DESTS, first[2], dest)
end
local function hook_done(did, dest)
  redis.call('ZREM', k_dest_due(dest), did)
  local first = redis.call('ZRANGE', k_dest_due(dest), 0, 0, 'WITHSCORES')
  if first[1] then redis.call('ZADD', K_HOOK_DESTS, first[2], dest) else redis.call('ZREM', K_HOOK_DESTS, dest) end
end
-- whether the webhook of the job (`j`: its HOOK_FIELDS) delivers `event`, and its decoded JSON
local function hook_wants(j, event)
  if not j.webhook or j.hook_stopped == '1' then return false end
  local hook = cjson.decode(j.webhook)
  for _, e in ipairs(hook.events) do if e == event then return true, hook end end
  return false
end
-- put `event` of job `id` in the webhook outbox when its webhook asks for it; `j`: the job's HOOK_FIELDS
-- (webhook, key_id, hook_stopped, hook_progress), read by the caller with its own
local function outbox(id, event, t, j)
  local h = {j.webhook, j.key_id, j.hook_stopped, j.hook_progress}
  local wanted, hook = hook_wants(j, event)
  if not wanted then return end
  local did = id .. '-' .. event
  if event == 'progress' then
    -- one waiting progress delivery at a time: it carries the status when it is sent
    if h[4] and redis.call('HGET', k_hook(h[4]), 'attempts') == '0' then return end
    did = did .. '-' .. redis.call('HINCRBY', k_job(id), 'hook_progress_n', 1)
    redis.call('HSET', k_job(id), 'hook_progress', did)
  end
  if redis.call('EXISTS', k_hook(did)) == 1 then return end
  local dest = destination(hook.url)
  redis.call('HSET', k_hook(did), 'id', did, 'job', id, 'event', event, 'url', hook.url, 'key_id', h[2] or '',
    'state', 'pending', 'attempts', 0, 'dest', dest)
  hook_due(did, dest, num(t))
  redis.call('PUBLISH', K_HOOKS_NEW, did)  -- idle runners wake (`wait_for_webhooks`)
end
"""

HOOK_BODIES: dict[str, str] = {
    # ARGV: token, lease seconds, limit, per destination (0: no bound), {destination: tries in flight} JSON,
    # per key (0: no bound), {key id: tries in flight} JSON, how far past a destination's room to look.
    # Returns the claimed deliveries' hashes as JSON, then the seconds until the earliest delivery left
    # is due ('' when none is left).
    names.SCRIPT_HOOK_CLAIM: r"""
local t, token, limit, per_dest = now(), ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
local busy = cjson.decode(ARGV[7])
local per_key, keys, lookahead = tonumber(ARGV[8] or '0'), cjson.decode(ARGV[9] or '{}'), tonumber(ARGV[10] or '0')
if per_key <= 0 then lookahead = 0 end
local out = {}
for _, dest in ipairs(redis.call('ZRANGEBYSCORE', K_HOOK_DESTS, '-inf', num(t), 'LIMIT', 0, 1000)) do
  local room = limit - #out
  if per_dest > 0 then room = math.min(room, per_dest - (tonumber(busy[dest]) or 0)) end
  if limit - #out <= 0 then break end
  if room > 0 then
    for _, did in ipairs(redis.call('ZRANGEBYSCORE', k_dest_due(dest), '-inf', num(t), 'LIMIT', 0, room + lookahead)) do
      local hk = k_hook(did)
      local h = redis.call('HMGET', hk, 'state', 'job', 'key_id')
      local key = h[3] or ''
      if room <= 0 then break end
      if h[1] == 'pending' and per_key > 0 and (tonumber(keys[key]) or 0) >= per_key then
        -- the key holds its share of the slots: left due, for a later claim
      elseif h[1] == 'pending' and redis.call('HGET', k_job(h[2]), 'hook_stopped') ~= '1' then
        room = room - 1
        keys[key] = (tonumber(keys[key]) or 0) + 1
        redis.call('HSET', hk, 'token', token)
        redis.call('HINCRBY', hk, 'attempts', 1)
        hook_due(did, dest, num(t + tonumber(ARGV[4])))
        local d = redis.call('HMGET', hk, 'id', 'job', 'key_id', 'event', 'url', 'attempts')
        table.insert(out, cjson.encode(d))
      else
        hook_done(did, dest)
        if h[1] == 'pending' then redis.call('HSET', hk, 'state', 'stopped') end
        redis.call('EXPIRE', hk, HOOK_TTL)
      end
    end
  end
end
local first = redis.call('ZRANGE', K_HOOK_DESTS, 0, 0, 'WITHSCORES')
table.insert(out, first[2] and num(tonumber(first[2]) - t) or '')
return out
""",
    # ARGV: delivery id, token, attempt JSON, state, next_at
    names.SCRIPT_HOOK_RECORD: r"""
local hk = k_hook(ARGV[3])
local h = redis.call('HMGET', hk, 'token', 'job', 'dest', 'url')
if h[1] ~= ARGV[4] then return 0 end
local dest = h[3] or destination(h[4] or '')
redis.call('HDEL', hk, 'token')
redis.call('RPUSH', k_hook_log(h[2]), ARGV[5])
redis.call('EXPIRE', k_hook_log(h[2]), HOOK_TTL)
if ARGV[6] == 'pending' then
  hook_due(ARGV[3], dest, ARGV[7])
else
  redis.call('HSET', hk, 'state', ARGV[6])
  hook_done(ARGV[3], dest)
  redis.call('EXPIRE', hk, HOOK_TTL)
  -- 410: no more deliveries for this job (a job that expired is not brought back)
  if ARGV[6] == 'stopped' and redis.call('EXISTS', k_job(h[2])) == 1 then
    redis.call('HSET', k_job(h[2]), 'hook_stopped', '1')
  end
end
return 1
""",
}


class RedisHooks:
    """The webhook methods of `JobStore` for `RedisStore`."""

    if TYPE_CHECKING:
        keys: Keys

        async def _call(self, script: str, *args: str | int | float | bytes) -> Any: ...
        async def _conn(self) -> Redis: ...
        async def _listen(self, channel: str, *, pattern: bool) -> None: ...

        _subscribed: dict[str, asyncio.Event]
        #: Set by every publication on ``hooks-new`` (and on a gap in the subscription).
        _hooks_heard: asyncio.Event
        #: When (monotonic) the earliest delivery the last claim left is due.
        _hooks_due_at: float

    async def idempotent_request(self, key_id: str, idempotency_key: str) -> tuple[str, str] | None:
        raw = await (await self._conn()).get(self.keys.idempotency(key_id, idempotency_key))
        if raw is None:
            return None
        first = json.loads(raw)
        return str(first["job"]), str(first["hash"])

    async def claim_webhooks(self, lease_seconds: float, limit: int, *, per_destination: int = 0,
                             busy: Mapping[str, int] | None = None, per_key: int = 0,
                             busy_keys: Mapping[str, int] | None = None) -> list[WebhookDelivery]:
        token = uuid.uuid4().hex
        got = await self._call(names.SCRIPT_HOOK_CLAIM, token, repr(float(lease_seconds)), int(limit),
                               int(per_destination), json.dumps(dict(busy or {})), int(per_key),
                               json.dumps(dict(busy_keys or {})), CLAIM_LOOKAHEAD)
        *got, due_in = got
        self._hooks_due_at = time.monotonic() + float(due_in) if due_in else float("inf")
        out = []
        for raw in got:
            did, job_id, key_id, event, url, attempts = json.loads(raw)
            out.append(WebhookDelivery(id=did, job_id=job_id, key_id=key_id or None, event=event, url=url,
                                       attempt=int(attempts), token=token))
        return out

    async def wait_for_webhooks(self, poll: float) -> None:
        # Every delivery made publishes on ``hooks-new``: a runner sleeps until one is made, or until
        # the earliest one its last claim left is due (at least `poll`, at most HOOKS_IDLE seconds).
        # A delivery made before the subscription went unheard: the first call returns at once.
        if self.keys.hooks_new not in self._subscribed:
            await self._listen(self.keys.hooks_new, pattern=False)
            return
        wait = max(poll, min(self._hooks_due_at - time.monotonic(), HOOKS_IDLE))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._hooks_heard.wait()
        self._hooks_heard.clear()

    async def record_webhook(self, delivery: WebhookDelivery, attempt: WebhookAttempt, state: str,
                             next_at: float = 0.0) -> bool:
        return bool(await self._call(names.SCRIPT_HOOK_RECORD, delivery.id, delivery.token,
                                     json.dumps(attempt.to_dict()), state, repr(float(next_at))))

    async def webhook_attempts(self, job_id: str) -> list[WebhookAttempt]:
        rows = await (await self._conn()).lrange(self.keys.hook_log(job_id), 0, -1)
        return [WebhookAttempt(**json.loads(row)) for row in rows]

    async def webhook_secret(self, key_id: str) -> str:
        r = await self._conn()
        await r.hsetnx(self.keys.webhook_secrets, key_id, new_webhook_secret())
        secret = await r.hget(self.keys.webhook_secrets, key_id)
        assert isinstance(secret, bytes)
        return secret.decode()

    async def rotate_webhook_secret(self, key_id: str) -> str:
        secret = new_webhook_secret()
        await (await self._conn()).hset(self.keys.webhook_secrets, key_id, secret)
        return secret

    async def current_webhook_secret(self, key_id: str) -> str | None:
        secret = await (await self._conn()).hget(self.keys.webhook_secrets, key_id)
        return secret.decode() if isinstance(secret, bytes) else None
