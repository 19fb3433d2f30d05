"""The one move from the Redis layout before the plain queue (a stream of tickets) to this one.

That layout kept, besides the fair queue both share (``fair-queue:{key id}``, ``fair-active``, ``fair``):
a stream ``queue`` with the consumer group ``workers`` (one ticket per queued or running job), the hash
``tickets`` (entry id → job id), the sorted set ``queued`` (QUEUED ids by submit order), the set
``processing`` (PROCESSING ids), the job fields ``entry`` and ``lease_ms``, and an older version's
webhook deliveries in one due set ``hooks-due``. `RedisStore.open` runs `SCRIPT` when any of those
keys exists: every PROCESSING job gets its member in ``leases`` (scored by its lease deadline, so a
lease that ran out meanwhile is reclaimed at once), the QUEUED jobs are counted (``fair`` ``queued``)
and each is in its key's queue, the deliveries go to their destination's queue, and the old keys
go. The script is atomic and finds nothing to do a second time, so processes that start together
move everything once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kolors_api.jobs import redis_keys as names

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from kolors_api.jobs.redis_keys import Keys

#: The old layout's names (appended to the prefix).
OLD_KEYS = ("queue", "tickets", "queued", "processing", "hooks-due")

#: ARGV[1] is the prefix; the common helpers are not needed (the names come from redis_keys).
SCRIPT = names.LUA_KEYS + r"""
local OLD_STREAM, OLD_TICKETS, OLD_QUEUED = P .. 'queue', P .. 'tickets', P .. 'queued'
local OLD_PROCESSING, OLD_HOOKS_DUE = P .. 'processing', P .. 'hooks-due'
local running, queued = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', OLD_PROCESSING)) do
  local h = redis.call('HMGET', k_job(id), 'state', 'lease_until')
  if h[1] == 'PROCESSING' then
    redis.call('ZADD', K_LEASES, tonumber(h[2] or '0') or 0, id)
    running = running + 1
  end
  redis.call('HDEL', k_job(id), 'entry', 'lease_ms')
end
for _, id in ipairs(redis.call('ZRANGE', OLD_QUEUED, 0, -1)) do
  local h = redis.call('HMGET', k_job(id), 'state', 'key_id', 'odo')
  if h[1] == 'QUEUED' then
    queued = queued + 1
    local kid = h[2] or ''
    if not redis.call('ZSCORE', k_fair_queue(kid), id) then
      redis.call('ZADD', k_fair_queue(kid), tonumber(h[3] or '0') or 0, id)
    end
    if not redis.call('ZSCORE', K_FAIR_ACTIVE, kid) then
      redis.call('ZADD', K_FAIR_ACTIVE, tonumber(redis.call('HGET', K_FAIR, 'vtime') or '0'), kid)
    end
    redis.call('RPUSH', K_WAKE, '1')
  end
  redis.call('HDEL', k_job(id), 'entry')
end
redis.call('HINCRBY', K_FAIR, F_QUEUED, queued)
redis.call('HDEL', K_FAIR, F_LEASE_MIN)  -- leases came: the claims look at them again
local due = redis.call('ZRANGE', OLD_HOOKS_DUE, 0, -1, 'WITHSCORES')
for i = 1, #due, 2 do
  local url = redis.call('HGET', k_hook(due[i]), 'url')
  if url then
    local rest = string.match(url, '^[^:/?#]*://(.*)$') or url
    rest = string.match(rest, '^[^/?#]*')
    local dest = string.lower(string.match(rest, '([^@]*)$'))
    redis.call('HSET', k_hook(due[i]), 'dest', dest)
    redis.call('ZADD', k_dest_due(dest), due[i + 1], due[i])
    local first = redis.call('ZRANGE', k_dest_due(dest), 0, 0, 'WITHSCORES')
    redis.call('ZADD', K_HOOK_DESTS, first[2], dest)
  end
end
redis.call('DEL', OLD_STREAM, OLD_TICKETS, OLD_QUEUED, OLD_PROCESSING, OLD_HOOKS_DUE)
return {queued, running}
"""


#: KEYS: a ``running:{key id}`` counter, ``fair``; ARGV: its field there. Adds the one to the other, once.
_MOVE_RUNNING = """
local n = redis.call('GET', KEYS[1])
if n then
  redis.call('HINCRBY', KEYS[2], ARGV[1], tonumber(n))
  redis.call('DEL', KEYS[1])
end
return 1
"""


#: Counts each active key's queued jobs into ``fair`` ``n:{key id}`` and marks ``fair`` ``n_exact``: from then on
#: the counts are exact (a claim trusts them: `redis_fair.fair_served`). ARGV[1]: the prefix.
_COUNT_QUEUED = names.LUA_KEYS + r"""
for _, kid in ipairs(redis.call('ZRANGE', K_FAIR_ACTIVE, 0, -1)) do
  redis.call('HSET', K_FAIR, 'n:' .. kid, redis.call('ZCARD', k_fair_queue(kid)))
end
redis.call('HSET', K_FAIR, F_N_EXACT, '1')
return 1
"""


async def count_queued(r: Redis, keys: Keys) -> None:
    """Layouts before this one kept each key's queued count loosely (or not at all): count them, once."""
    if not await r.hexists(keys.fair, names.N_EXACT):
        await r.eval(_COUNT_QUEUED, 0, keys.prefix)


async def move_running(r: Redis, keys: Keys) -> None:
    """Each key's count of unfinished jobs was a key ``running:{key id}``; it is ``fair``'s ``r:{key id}``
    now: move the counters over, once per ``fair`` (marked ``running_moved``)."""
    if await r.hexists(keys.fair, "running_moved"):
        return
    stem = keys.prefix + names.RUNNING
    async for name in r.scan_iter(match=names.glob_escape(stem) + "*", count=1000):
        text = name.decode() if isinstance(name, bytes) else str(name)
        await r.eval(_MOVE_RUNNING, 2, text, keys.fair, "r:" + text.removeprefix(stem))
    await r.hset(keys.fair, "running_moved", "1")
