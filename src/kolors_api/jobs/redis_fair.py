"""The Redis store's queue: the fair order (`kolors_api.jobs.fair`) and the leases, as Lua helpers and scripts.

Queued jobs wait in one sorted set per key (``fair-queue:{key id}``, by odometer: first in, first out),
and the keys with queued jobs in ``fair-active`` by start tag, so taking the head is two ZPOPMINs:
O(log n) (a claim takes the key out of ``fair-active`` and puts it back with its new tag while more of
its jobs are queued: the claim of its last one writes nothing there). ``fair`` keeps, besides the
virtual time, the queued count and ``lease_min`` (a lower bound of the lease deadlines: a claim looks at
``leases`` only once it is past), each key's finish tag, odometer, queued count (``n:{key id}``),
weight (``w:{key id}``, copied from the key) and count of jobs not finished (``r:{key id}``: QUEUED +
PROCESSING, for ``max_concurrency``: kept for the keys that have one; a job of a key without is
``uncounted``, and `count_unfinished` counts them when needed). A claimed job's lease is its member in
``leases``, scored by its deadline: a claim takes a job whose lease ran out first (the first of
``leases``, when ``lease_min`` is past), then the fair head. A submit pushes onto ``wake`` for a worker
asleep there (BLPOP) that none was pushed for yet (``fair`` ``idle``).

`LUA_FAIR` is part of every script's common helpers (it needs `num`, `now`, `fields` and `take`'s
callers from there).
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
local function valid_weight(w)
  w = tonumber(w or '')
  if not w or w ~= w or w <= 0 then return nil end
  return w
end
local function fair_weight(kid)
  if kid == '' then return 1 end
  return valid_weight(redis.call('HGET', k_key(kid), 'weight')) or 1
end
-- the fields of ``fair`` a submit of key `kid`'s job reads, in one HMGET (as a table): besides the queue's,
-- the key's weight and unfinished jobs (``w:``, ``r:``) and ``lim:`` ('0': the key has neither credits nor
-- max_concurrency, so a submit need not read it; absent: unknown)
local function fair_submit_fields(kid)
  local v = redis.call('HMGET', K_FAIR, 'odo:' .. kid, F_QUEUED, 'n:' .. kid, 'finish:' .. kid, 'vtime', 'seq',
    'company', 'r:' .. kid, 'w:' .. kid, 'lim:' .. kid, F_IDLE)
  return {odo = v[1], queued = v[2], n = v[3], finish = v[4], vtime = v[5], seq = v[6], company = v[7], r = v[8],
    w = v[9], lim = v[10], idle = v[11]}
end
-- the submission sequence number the next job gets (`f`: `fair_submit_fields`)
local function fair_seq(f)
  -- (a store of the layout before kept the sequence in its own key)
  return tonumber(f.seq or redis.call('GET', K_SEQ) or '0') + 1
end
-- a new QUEUED job: its place in its key's queue, one more queued (of the key too), its key active;
-- `f`: `fair_submit_fields`; `key`: for a job of an API key, its weight and `lim` (written to ``fair``
-- for the claims and the next submit). Returns the job's odometer, whether a worker waits for
-- company (``company`` ahead of now), and whether one sleeps uncounted-for (``idle``: it takes one; the
-- caller pushes it a wake-up).
local function fair_enqueue(id, kid, work, f, key)
  local odo, n = tonumber(f.odo or '0'), tonumber(f.n or '0')
  local set = {'odo:' .. kid, num(odo + work), F_QUEUED, tonumber(f.queued or '0') + 1, 'n:' .. kid, n + 1,
    'seq', fair_seq(f)}
  if key then  -- a job of an API key: the key's weight and limits
    for _, x in ipairs({'w:' .. kid, key.weight, 'lim:' .. kid, key.lim}) do table.insert(set, x) end
    if key.most then  -- one more of its jobs not finished, for max_concurrency (else the job is `uncounted`)
      table.insert(set, 'r:' .. kid)
      table.insert(set, tonumber(f.r or '0') + 1)
    end
  end
  local idle = tonumber(f.idle or '0')
  if idle > 0 then
    table.insert(set, F_IDLE)
    table.insert(set, idle - 1)
  end
  redis.call('HSET', K_FAIR, unpack(set))
  redis.call('ZADD', k_fair_queue(kid), num(odo), id)
  -- the key's count is reset whenever it leaves `fair-active`, so 0 here means it is not in it (NX: or a
  -- store of the layout before, which kept no count, put it there)
  if n <= 0 then
    redis.call('ZADD', K_FAIR_ACTIVE, 'NX', num(math.max(tonumber(f.finish or '0'), tonumber(f.vtime or '0'))), kid)
  end
  return odo, (tonumber(f.company) or 0) > now(), idle > 0
end
-- key `kid`'s jobs not finished (QUEUED or PROCESSING), counted: the queue's and the leases' (O(its queue
-- and every lease)); `recount`: make that ``r:`` and count each of them there from now on (it has
-- max_concurrency now; jobs submitted without one were `uncounted`)
local function count_unfinished(kid, recount)
  local ids = redis.call('ZRANGE', k_fair_queue(kid), 0, -1)
  for _, id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    if redis.call('HGET', k_job(id), 'key_id') == kid then table.insert(ids, id) end
  end
  local n = 0
  for _, id in ipairs(ids) do
    local state = redis.call('HGET', k_job(id), 'state')
    if state == 'QUEUED' or state == 'PROCESSING' then
      n = n + 1
      if recount then redis.call('HDEL', k_job(id), 'uncounted') end
    end
  end
  if recount then redis.call('HSET', K_FAIR, 'r:' .. kid, n) end
  return n
end
-- a QUEUED job left unserved (cancelled): no charge
local function fair_left(id, kid)
  redis.call('ZREM', k_fair_queue(kid), id)
  local f = redis.call('HMGET', K_FAIR, F_QUEUED, 'n:' .. kid)
  local left = redis.call('ZCARD', k_fair_queue(kid))
  redis.call('HSET', K_FAIR, F_QUEUED, tonumber(f[1] or '1') - 1, 'n:' .. kid, left)
  if left == 0 then redis.call('ZREM', K_FAIR_ACTIVE, kid) end
end
-- the fields of ``fair`` a claim of key `kid`'s job reads and writes, in one HMGET (as a table)
local function fair_fields(kid)
  local v = redis.call('HMGET', K_FAIR, 'vtime', 'finish:' .. kid, F_QUEUED, 'w:' .. kid, 'n:' .. kid, F_LEASE_MIN,
    F_N_EXACT, F_IDLE)
  return {vtime = v[1], finish = v[2], queued = v[3], w = v[4], n = v[5], lease_min = v[6], n_exact = v[7],
    idle = v[8]}
end
-- a QUEUED job was taken, its lease running until `lease_until`: its key's tag (`q.start` when known)
-- moves by work / weight, the virtual time to the key's start. `q` (may be nil): what the claim knows
-- already: `f` (`fair_fields`), `start`, `popped` (the job left its key's queue already).
-- ``lease_min`` (a lower bound of every lease's deadline, absent: unknown) moves down to the new lease's.
local function fair_served(id, kid, work, lease_until, q)
  q = q or {}
  if not q.popped then redis.call('ZREM', k_fair_queue(kid), id) end
  local f = q.f or fair_fields(kid)
  local vtime = tonumber(f.vtime or '0')
  local start = q.start or tonumber(redis.call('ZSCORE', K_FAIR_ACTIVE, kid) or '')
  if not start then start = math.max(tonumber(f.finish or '0'), vtime) end
  local weight = kid == '' and 1 or valid_weight(f.w) or fair_weight(kid)
  local finish = start + work / weight
  -- the key's count says whether more are queued (it may be over, never under: a stale entry popped
  -- counted); until ``n_exact`` (layouts before counted loosely) below 2 the queue itself
  local n = tonumber(f.n or '0')
  local more = n > 1 or (f.n_exact ~= '1' and redis.call('ZCARD', k_fair_queue(kid)) > 0)
  local set = {'vtime', num(math.max(vtime, start)), 'finish:' .. kid, num(finish),
    F_QUEUED, tonumber(f.queued or '1') - 1, 'n:' .. kid, more and math.max(1, n - 1) or 0}
  -- the claimer slept counted in ``idle``, and took no wake-up: it sleeps no more; it took the last queued
  -- job (`q.sleeper`: it sleeps when it finds nothing): counted now, so it sleeps at once next time
  q.sleeper = q.sleeper and not more and tonumber(f.queued or '2') <= 1
  if q.uncount or q.sleeper then
    table.insert(set, F_IDLE)
    table.insert(set, math.max(0, tonumber(f.idle or '0') - (q.uncount and 1 or 0)) + (q.sleeper and 1 or 0))
  end
  local bound = tonumber(f.lease_min or '')
  if q.sleeper then q.lease_min = num(math.min(bound or 0, lease_until)) end
  if bound and (lease_until < bound or f.bound_changed) then
    table.insert(set, F_LEASE_MIN)
    table.insert(set, num(math.min(bound, lease_until)))
  end
  redis.call('HSET', K_FAIR, unpack(set))
  if more then
    redis.call('ZADD', K_FAIR_ACTIVE, num(finish), kid)
  elseif not q.unlisted then  -- (a claim took the key out of `fair-active` already: `fair_take_top`)
    redis.call('ZREM', K_FAIR_ACTIVE, kid)
  end
end
"""

# The fair head and the claims: after `take` in the common helpers (redis_lua), which they call.
LUA_CLAIM = r"""
-- the key with the smallest tag (ties: the smaller key id) and its tag, taken out of `fair-active`
-- (the claim puts it back with its new tag while it has jobs queued: `fair_served`, `fair_untake`), or nil.
-- (Taken, not read: the claim of a key's last queued job then writes nothing to `fair-active`.)
local function fair_take_top()
  local top = redis.call('ZPOPMIN', K_FAIR_ACTIVE)
  return top[1], tonumber(top[2] or '')
end
-- key `kid` taken by `fair_take_top` goes back as it was (the claim served none of its jobs)
local function fair_untake(kid, start)
  if kid then redis.call('ZADD', K_FAIR_ACTIVE, num(start), kid) end
end
-- the oldest queued job of key `kid` (tag `start`, `f` its `fair_fields`; taken out of `fair-active` by
-- `fair_take_top`), taken out of its key's queue, and its `whole` hash; else the next key's. Returns
-- id, hash, and the `q` of `fair_served`; nil when none is queued.
local function fair_pop(kid, start, f)
  for _ = 1, 1000 do
    if not kid then return nil end
    local head = redis.call('ZPOPMIN', k_fair_queue(kid))
    if not head[1] then  -- an empty queue left active: the next key (this one stays out of `fair-active`)
      redis.call('HSET', K_FAIR, 'n:' .. kid, 0)
      local known = f
      kid, start = fair_take_top()
      if kid then
        f = fair_fields(kid)
        f.lease_min, f.bound_changed, f.uncount = known.lease_min, known.bound_changed, known.uncount
      end
    else
      local j = whole(head[1])
      if j.state == 'QUEUED' then
        return head[1], j, {f = f, start = start, popped = true, unlisted = true, uncount = f.uncount}
      end
      -- not queued any more: a stale entry (popped)
    end
  end
  fair_untake(kid, start)  -- (stale entries without end: the next claim goes on with this key)
  return nil
end
"""

BODIES: dict[str, str] = {
    # ARGV: worker, token, lease_ms, max_deliveries, (unused), '1' when the caller is counted in ``idle`` (it
    # slept since its last claim found nothing, and took no wake-up), '1' when it will sleep if this finds nothing.
    # Returns {'ok', job…}, {'drained', lease_min, job…} (the last queued job: the caller is counted in
    # ``idle`` already, and blocks on `wake` at its next claim) or {'none', lease_min} (the caller then
    # blocks on `wake`, until lease_min at most: no lease runs out before).
    names.SCRIPT_CLAIM: r"""
local worker, token, lease_ms, max_deliveries = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = now()
local kid, start = fair_take_top()
local f = fair_fields(kid or '')
f.uncount = ARGV[8] == '1'
-- (a claimer counted in ``idle`` that takes a job: one less)
local function uncount()
  if f.uncount then redis.call('HSET', K_FAIR, F_IDLE, math.max(0, tonumber(f.idle or '0') - 1)) end
end
-- a job whose worker stopped renewing its lease: one more delivery, or dead after max_deliveries. None
-- ran out while ``lease_min`` (a lower bound of the deadlines) is not past.
local bound = tonumber(f.lease_min or '')
if not bound or bound < t then
  for _ = 1, 1000 do
    local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
    if not first[1] then bound = 1e300 break end
    if tonumber(first[2]) >= t then bound = tonumber(first[2]) break end
    local id = first[1]
    local j = whole(id)
    if j.state ~= 'PROCESSING' then
      redis.call('ZREM', K_LEASES, id)  -- it ended meanwhile: a stale entry
    else
      redis.call('HINCRBY', K_COUNTERS, F_RECLAIMS, 1)
      local deliveries = tonumber(j.deliveries or '0')
      if deliveries < max_deliveries then
        redis.call('HDEL', K_FAIR, F_LEASE_MIN)  -- (the next claim looks again)
        uncount()
        fair_untake(kid, start)
        return with_status('ok', take(id, j, worker, token, lease_ms, t))
      end
      local reason = 'worker lost ' .. deliveries .. ' times'
      -- back to QUEUED when the lease ran out, as readers saw it (`as_seen`): one change before
      fail_job(id, reason, t, j, 1)
      redis.call('XADD', K_DEAD, 'MAXLEN', '~', 10000, '*', 'job', id, 'reason', reason, 'at', num(t))
      redis.call('HINCRBY', K_COUNTERS, F_DEAD, 1)
    end
  end
  f.lease_min = num(bound)
  f.bound_changed = true
end
local id, j, q = fair_pop(kid, start, f)
if id then
  q.sleeper = ARGV[9] == '1'
  local flat = take(id, j, worker, token, lease_ms, t, q)
  if q.sleeper then return with_status('drained', with_status(q.lease_min, flat)) end
  return with_status('ok', flat)
end
-- nothing queued: the caller sleeps on ``wake`` (unless ARGV[9] says it will not wait), counted in ``idle``
-- (the sleepers no wake-up was pushed for: a submit pushes one while it is above 0, and takes one off). Only
-- a sleeper takes a wake-up off the list, so every sleeper has one coming, or is counted. (A wake-up left
-- for a worker that died asleep wakes the next sleeper once, for nothing.)
local idle, set = tonumber(f.idle or '0'), {}
if ARGV[9] == '1' and (not f.uncount or idle == 0) then idle = idle + 1 end  -- (0: it was lost; a Redis restart)
if idle ~= tonumber(f.idle or '0') then set = {F_IDLE, idle} end
if f.bound_changed then
  table.insert(set, F_LEASE_MIN)
  table.insert(set, f.lease_min)
end
if set[1] then redis.call('HSET', K_FAIR, unpack(set)) end
return {'none', f.lease_min}
""",
    # ARGV: worker, lease_ms, then (job id, token) pairs. Takes each of those jobs that is still QUEUED;
    # returns {job id, job…} lists of those taken.
    names.SCRIPT_CLAIM_BATCH: r"""
local worker, lease_ms, t = ARGV[3], tonumber(ARGV[4]), now()
local out = {}
for i = 5, #ARGV, 2 do
  local j = whole(ARGV[i])
  if j.state == 'QUEUED' then table.insert(out, take(ARGV[i], j, worker, ARGV[i + 1], lease_ms, t)) end
end
return out
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
-- lapsed leases (before this one's, when its own lapsed): served first
local lapsed = redis.call('ZCOUNT', K_LEASES, '-inf', '(' .. num(mine_until or t))
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
    """The first queued jobs of the keys with the smallest tags, `window` jobs in all (for a batch's `choose`):
    one round trip when nothing is queued, three else."""
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
