"""The Redis store's fair queue (`kolors_api.jobs.fair`) and its tickets, as Lua helpers and scripts.

Queued jobs wait in one sorted set per key (``fair-queue:{key id}``, by odometer: first in, first
out), and the keys with queued jobs in ``fair-active`` by start tag, so a claim is two ZRANGEs:
O(log n). The stream keeps one *ticket* per queued or running job, so that its lag and pending
entries still count the waiting and the running jobs (KEDA scales on them) and a dead worker's job
is still found by XAUTOCLAIM: a claim reads the next unread ticket inside its script and binds it to
the job it takes (``tickets``); a cancelled queued job takes an unread ticket away with it.

`LUA_FAIR` is part of every script's common helpers (it needs `num` and `now` from there).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kolors_api.jobs import fair
from kolors_api.jobs import redis_keys as names

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from kolors_api.jobs.redis_keys import Keys

LUA_FAIR = r"""
local function fair_weight(kid)
  if kid == '' then return 1 end
  local w = tonumber(redis.call('HGET', k_key(kid), 'weight') or '1')
  if not w or w ~= w or w <= 0 then return 1 end
  return w
end
local function fair_vtime() return tonumber(redis.call('HGET', K_FAIR, 'vtime') or '0') end
local function fair_activate(kid)
  if not redis.call('ZSCORE', K_FAIR_ACTIVE, kid) then
    local finish = tonumber(redis.call('HGET', K_FAIR, 'finish:' .. kid) or '0')
    redis.call('ZADD', K_FAIR_ACTIVE, num(math.max(finish, fair_vtime())), kid)
  end
end
-- a new QUEUED job: its odometer, its place in its key's queue, its key active
local function fair_enqueue(id, kid, work)
  local odo = tonumber(redis.call('HGET', K_FAIR, 'odo:' .. kid) or '0')
  redis.call('HSET', k_job(id), 'work', num(work), 'odo', num(odo))
  redis.call('HSET', K_FAIR, 'odo:' .. kid, num(odo + work))
  redis.call('ZADD', k_fair_queue(kid), num(odo), id)
  fair_activate(kid)
end
-- a QUEUED job left unserved (cancelled): no charge
local function fair_left(id, kid)
  redis.call('ZREM', k_fair_queue(kid), id)
  if redis.call('ZCARD', k_fair_queue(kid)) == 0 then redis.call('ZREM', K_FAIR_ACTIVE, kid) end
end
-- a QUEUED job was taken: its key's tag moves by work / weight, the virtual time to the key's start
local function fair_served(id, kid, work)
  redis.call('ZREM', k_fair_queue(kid), id)
  local vtime = fair_vtime()
  local start = tonumber(redis.call('ZSCORE', K_FAIR_ACTIVE, kid) or '')
  if not start then start = math.max(tonumber(redis.call('HGET', K_FAIR, 'finish:' .. kid) or '0'), vtime) end
  local finish = start + work / fair_weight(kid)
  redis.call('HSET', K_FAIR, 'vtime', num(math.max(vtime, start)), 'finish:' .. kid, num(finish))
  if redis.call('ZCARD', k_fair_queue(kid)) > 0 then
    redis.call('ZADD', K_FAIR_ACTIVE, num(finish), kid)
  else
    redis.call('ZREM', K_FAIR_ACTIVE, kid)
  end
end
-- the oldest queued job of the key with the smallest tag (ties: the smaller key id), or nil
local function fair_head()
  for _ = 1, 1000 do
    local top = redis.call('ZRANGE', K_FAIR_ACTIVE, 0, 0)
    if not top[1] then return nil end
    local head = redis.call('ZRANGE', k_fair_queue(top[1]), 0, 0)
    if not head[1] then
      redis.call('ZREM', K_FAIR_ACTIVE, top[1])
    elseif redis.call('HGET', k_job(head[1]), 'state') == 'QUEUED' then
      return head[1]
    else
      redis.call('ZREM', k_fair_queue(top[1]), head[1])  -- not queued any more: a stale index entry
    end
  end
  return nil
end
local function ensure_group()
  if redis.call('EXISTS', K_STREAM) == 0 then
    redis.call('XGROUP', 'CREATE', K_STREAM, K_GROUP, '0', 'MKSTREAM')
  end
end
-- the next unread ticket, read for `worker` (a fresh one when a cancel took the last)
local function next_ticket(worker, id)
  ensure_group()
  for _ = 1, 2 do
    local r = redis.call('XREADGROUP', 'GROUP', K_GROUP, worker, 'COUNT', 1, 'STREAMS', K_STREAM, '>')
    if r and r[1] and r[1][2][1] then return r[1][2][1][1] end
    redis.call('XADD', K_STREAM, '*', 'job', id)
  end
  error('no ticket could be read')
end
-- a queued job that leaves takes the newest unread ticket with it (none is unread while a worker
-- holds the last one it read: that worker's claim then finds no job and acks it)
local function drop_ticket()
  if redis.call('EXISTS', K_STREAM) == 0 then return end
  local last = redis.call('XREVRANGE', K_STREAM, '+', '-', 'COUNT', 1)[1]
  if last and #redis.call('XPENDING', K_STREAM, K_GROUP, last[1], last[1], 1) == 0 then
    redis.call('XDEL', K_STREAM, last[1])
  end
end
local function last_ticket()
  if redis.call('EXISTS', K_STREAM) == 0 then return '0-0' end
  local last = redis.call('XREVRANGE', K_STREAM, '+', '-', 'COUNT', 1)[1]
  return last and last[1] or '0-0'
end
"""

BODIES: dict[str, str] = {
    # ARGV: worker, token, lease_ms, horizon_ms, max_deliveries. Returns {'ok', job…} or {'none', the
    # id of the newest ticket} (the caller blocks in XREAD for a ticket after it).
    names.SCRIPT_CLAIM: r"""
local worker, token, lease_ms, horizon = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local max_deliveries = tonumber(ARGV[7])
local t = now()
if redis.call('EXISTS', K_STREAM) == 1 then
  local cursor = '0-0'
  for _ = 1, 1000 do
    local r = redis.call('XAUTOCLAIM', K_STREAM, K_GROUP, worker, horizon, cursor, 'COUNT', 1)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if type(e) == 'table' then
        local entry = e[1]
        local id = redis.call('HGET', K_TICKETS, entry)
        if not id and e[2][2] and redis.call('HGET', k_job(e[2][2]), 'entry') == entry then
          id = e[2][2]  -- bound by its submit, before tickets were bound by claims
        end
        local h = id and redis.call('HMGET', k_job(id), 'state', 'lease_until', 'lease_worker', 'deliveries')
        if not id then
          -- read by a worker that died before its claim bound it: it stands for the next fair job
          local head = fair_head()
          if head then return take(head, entry, worker, token, lease_ms, horizon, t) end
          ack(entry)
        elseif h[1] == 'PROCESSING' and h[2] and tonumber(h[2]) > t then
          -- its lease still runs (one longer than the horizon): back to its holder, idle restored
          redis.call('XCLAIM', K_STREAM, K_GROUP, h[3], 0, entry,
            'IDLE', idle_for((tonumber(h[2]) - t) * 1000, horizon), 'JUSTID')
        elseif h[1] == 'PROCESSING' or h[1] == 'QUEUED' then
          local got = reclaim(id, entry, h[1], tonumber(h[4]), worker, token, lease_ms, horizon, max_deliveries, t)
          if got[1] == 'ok' then return got end
        else
          ack(entry)  -- the job ended or went: nothing to deliver
        end
      end
    end
    if cursor == '0-0' then break end
  end
end
local head = fair_head()
if head then return take(head, nil, worker, token, lease_ms, horizon, t) end
return {'none', last_ticket()}
""",
    # ARGV: worker, token, lease_ms, horizon_ms, job id
    names.SCRIPT_CLAIM_QUEUED: r"""
local id = ARGV[7]
if redis.call('HGET', k_job(id), 'state') ~= 'QUEUED' then return {'none'} end
return take(id, nil, ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), now())
""",
    # ARGV: job id. Returns -1 when the job is not queued, else how many queued jobs the fair order
    # serves before it (fair.bound, for each key whose tag is not past the job's)
    # A PROCESSING job whose lease ran out counts as QUEUED: served before every queued job (claim), in
    # the order of its lease deadline.
    names.SCRIPT_POSITION: r"""
local h = redis.call('HMGET', k_job(ARGV[3]), 'state', 'key_id', 'odo', 'lease_until')
local t = now()
local mine_until = h[1] == 'PROCESSING' and tonumber(h[4] or '') or nil
if mine_until and mine_until >= t then return -1 end
local lapsed = 0
for _, other in ipairs(redis.call('SMEMBERS', K_PROCESSING)) do
  local u = tonumber(redis.call('HGET', k_job(other), 'lease_until') or '')
  if u and u < t and (not mine_until or u < mine_until) then lapsed = lapsed + 1 end
end
if mine_until then return lapsed end
if h[1] ~= 'QUEUED' then return -1 end
local kid, odo = h[2] or '', tonumber(h[3] or '0')
local q = k_fair_queue(kid)
local ahead = lapsed + redis.call('ZCOUNT', q, '-inf', '(' .. num(odo))
local mine = tonumber(redis.call('ZSCORE', K_FAIR_ACTIVE, kid) or '')
if not mine then return ahead end
local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
local tag = mine + (odo - tonumber(head[2] or odo)) / fair_weight(kid)
local others = redis.call('ZRANGEBYSCORE', K_FAIR_ACTIVE, '-inf', num(tag), 'WITHSCORES')
for i = 1, #others, 2 do
  local other, start = others[i], tonumber(others[i + 1])
  if other ~= kid then
    local first = redis.call('ZRANGE', k_fair_queue(other), 0, 0, 'WITHSCORES')
    if first[1] then
      local limit = num(tonumber(first[2]) + (tag - start) * fair_weight(other))
      ahead = ahead + redis.call('ZCOUNT', k_fair_queue(other), '-inf', other < kid and limit or '(' .. limit)
    end
  end
end
return ahead
""",
}


async def candidates(r: Redis, keys: Keys, window: int) -> list[fair.KeyQueue]:
    """The first queued jobs of the keys with the smallest tags, `window` jobs in all (for `fair.fill`)."""
    active: Any = await r.zrange(keys.fair_active, 0, window - 1, withscores=True)
    if not active:
        return []
    each = fair.per_key(window, len(active))
    async with r.pipeline(transaction=False) as pipe:
        for member, _ in active:
            kid = _str(member)
            pipe.zrange(keys.fair_queue(kid), 0, each - 1)
            pipe.hget(keys.key(kid), "weight")
        got = await pipe.execute()
    ids = [[_str(i) for i in got[2 * n]] for n in range(len(active))]
    async with r.pipeline(transaction=False) as pipe:
        for job_ids in ids:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "params")
        raw = iter(await pipe.execute())
    queues = []
    for n, (member, start) in enumerate(active):
        jobs = [(job_id, json.loads(text)) for job_id in ids[n] if (text := next(raw))]
        queues.append(fair.KeyQueue(key=_str(member), start=float(start), weight=fair.weight_of(
            _str(got[2 * n + 1]) if got[2 * n + 1] is not None else None), jobs=jobs))
    return queues


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
