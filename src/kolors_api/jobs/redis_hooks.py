"""The Redis store's webhook outbox (a mixin of `RedisStore`) and its Lua.

`LUA_OUTBOX` is part of every script's common helpers: the scripts that change a job (claim, progress,
complete, fail, cancel) call `outbox(id, event, t)` in the same atomic step, so a delivery exists
exactly when its change does, whatever process dies after. A delivery's score in ``hooks-due`` is
when it is due; a claim pushes it one lease ahead and sets a token, so a runner that dies mid-attempt
leaves a delivery that is due again when the lease runs out.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import (
    WEBHOOK_LOG_SECONDS,
    WebhookAttempt,
    WebhookDelivery,
    new_webhook_secret,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from kolors_api.jobs.redis_keys import Keys

LUA_OUTBOX = f"""
local HOOK_TTL = {WEBHOOK_LOG_SECONDS}
""" + r"""
-- put `event` of job `id` in the webhook outbox when its webhook asks for it
local function outbox(id, event, t)
  local h = redis.call('HMGET', k_job(id), 'webhook', 'key_id', 'hook_stopped', 'hook_progress')
  if not h[1] or h[3] == '1' then return end
  local hook = cjson.decode(h[1])
  local wanted = false
  for _, e in ipairs(hook.events) do if e == event then wanted = true end end
  if not wanted then return end
  local did = id .. '-' .. event
  if event == 'progress' then
    -- one waiting progress delivery at a time: it carries the status when it is sent
    if h[4] and redis.call('HGET', k_hook(h[4]), 'attempts') == '0' then return end
    did = did .. '-' .. redis.call('HINCRBY', k_job(id), 'hook_progress_n', 1)
    redis.call('HSET', k_job(id), 'hook_progress', did)
  end
  if redis.call('EXISTS', k_hook(did)) == 1 then return end
  redis.call('HSET', k_hook(did), 'id', did, 'job', id, 'event', event, 'url', hook.url, 'key_id', h[2] or '',
    'state', 'pending', 'attempts', 0)
  redis.call('ZADD', K_HOOKS_DUE, num(t), did)
end
"""

HOOK_BODIES: dict[str, str] = {
    # ARGV: token, lease seconds, limit. Returns the claimed deliveries' hashes as JSON.
    names.SCRIPT_HOOK_CLAIM: r"""
local t, token = now(), ARGV[3]
local out = {}
for _, did in ipairs(redis.call('ZRANGEBYSCORE', K_HOOKS_DUE, '-inf', num(t), 'LIMIT', 0, tonumber(ARGV[5]))) do
  local hk = k_hook(did)
  local h = redis.call('HMGET', hk, 'state', 'job')
  if h[1] == 'pending' and redis.call('HGET', k_job(h[2]), 'hook_stopped') ~= '1' then
    redis.call('HSET', hk, 'token', token)
    redis.call('HINCRBY', hk, 'attempts', 1)
    redis.call('ZADD', K_HOOKS_DUE, num(t + tonumber(ARGV[4])), did)
    local d = redis.call('HMGET', hk, 'id', 'job', 'key_id', 'event', 'url', 'attempts')
    table.insert(out, cjson.encode(d))
  else
    redis.call('ZREM', K_HOOKS_DUE, did)
    if h[1] == 'pending' then redis.call('HSET', hk, 'state', 'stopped') end
    redis.call('EXPIRE', hk, HOOK_TTL)
  end
end
return out
""",
    # ARGV: delivery id, token, attempt JSON, state, next_at
    names.SCRIPT_HOOK_RECORD: r"""
local hk = k_hook(ARGV[3])
local h = redis.call('HMGET', hk, 'token', 'job')
if h[1] ~= ARGV[4] then return 0 end
redis.call('HDEL', hk, 'token')
redis.call('RPUSH', k_hook_log(h[2]), ARGV[5])
redis.call('EXPIRE', k_hook_log(h[2]), HOOK_TTL)
if ARGV[6] == 'pending' then
  redis.call('ZADD', K_HOOKS_DUE, ARGV[7], ARGV[3])
else
  redis.call('HSET', hk, 'state', ARGV[6])
  redis.call('ZREM', K_HOOKS_DUE, ARGV[3])
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

    async def idempotent_request(self, key_id: str, idempotency_key: str) -> tuple[str, str] | None:
        raw = await (await self._conn()).get(self.keys.idempotency(key_id, idempotency_key))
        if raw is None:
            return None
        first = json.loads(raw)
        return str(first["job"]), str(first["hash"])

    async def claim_webhooks(self, lease_seconds: float, limit: int) -> list[WebhookDelivery]:
        token = uuid.uuid4().hex
        got = await self._call(names.SCRIPT_HOOK_CLAIM, token, repr(float(lease_seconds)), int(limit))
        out = []
        for raw in got:
            did, job_id, key_id, event, url, attempts = json.loads(raw)
            out.append(WebhookDelivery(id=did, job_id=job_id, key_id=key_id or None, event=event, url=url,
                                       attempt=int(attempts), token=token))
        return out

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
