"""The Lua scripts of the Redis job store: one script per state change (see `redis.py`).

Each script is `redis_keys.LUA_KEYS` (the key names) + `_LUA_COMMON` (shared helpers) + its body.
"""

from __future__ import annotations

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import IDEMPOTENCY_SECONDS, MAX_CREDITS, MICRO
from kolors_api.jobs.redis_fair import BODIES as FAIR_BODIES
from kolors_api.jobs.redis_fair import LUA_FAIR
from kolors_api.jobs.redis_hooks import HOOK_BODIES, LUA_OUTBOX

# ARGV[1] is the prefix (see redis_keys.LUA_KEYS), ARGV[2] the retention in seconds; a script's own
# arguments start at ARGV[3].
_LUA_COMMON = f"""
local MICRO, MAX_MICRO = {MICRO}, {int(MAX_CREDITS * MICRO)}
""" + r"""
local RETENTION = tonumber(ARGV[2])
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
-- the lease `token` still holds: the job is PROCESSING under it and its deadline has not passed (past
-- it, every reader sees the job QUEUED again, and the next claim takes it)
local function holds(state, held_token, lease_until, token)
  return state == 'PROCESSING' and held_token == token and tonumber(lease_until or '0') >= now()
end
-- credits move as integer micro-credits (exact in a double below 2^53; see base.MAX_CREDITS)
local function micro(x) return math.floor(tonumber(x) * MICRO + 0.5) end
local function credits(u) return num(u / MICRO) end
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
    redis.call('HDEL', K_TICKETS, entry)
  end
end
-- the idle time that makes an entry reach the horizon when `remaining_ms` have passed
local function idle_for(remaining_ms, horizon)
  return math.max(0, math.floor(horizon - remaining_ms))
end
""" + LUA_OUTBOX + LUA_FAIR + r"""
-- COMPLETED or FAILED: leave the queue (a queued job takes an unread ticket with it), release the
-- key's slot, ack the job's ticket, start the TTL
local function finish(id, fields, t)
  local jk = k_job(id)
  local h = redis.call('HMGET', jk, 'state', 'key_id', 'entry')
  local exp = t + RETENTION
  redis.call('HSET', jk, 'finished_at', num(t), 'expires_at', num(exp), unpack(fields))
  redis.call('HDEL', jk, 'lease_token', 'lease_until', 'lease_ms')
  redis.call('HINCRBY', jk, 'version', 1)
  if h[1] == 'QUEUED' then
    redis.call('ZREM', K_QUEUED, id)
    fair_left(id, h[2] or '')
    drop_ticket()
  else
    redis.call('SREM', K_PROCESSING, id)
    ack(h[3])
  end
  if h[2] and redis.call('DECR', k_running(h[2])) <= 0 then redis.call('DEL', k_running(h[2])) end
  local at_ms = math.ceil(exp * 1000)
  redis.call('PEXPIREAT', jk, at_ms)
  redis.call('ZADD', K_EXPIRING, num(exp), cjson.encode({id, h[2] or ''}))
  return at_ms
end
local function fail_job(id, err, t)
  local h = redis.call('HMGET', k_job(id), 'key_id', 'cost', 'reserved')
  finish(id, {'state', 'FAILED', 'error', err}, t)
  outbox(id, 'failed', t)
  local kid, cost = h[1], tonumber(h[2] or '0')
  if kid and cost ~= 0 and h[3] == '1' then
    local have = redis.call('HGET', k_key(kid), 'credits')
    if have then redis.call('HSET', k_key(kid), 'credits', credits(micro(have) + micro(cost))) end
    ledger(kid, id, 'refund', micro(cost) / MICRO, t)
  end
  publish(id)
end
-- lease job `id` to `worker`, bound to ticket `entry` (nil: the next unread ticket)
local function take(id, entry, worker, token, lease_ms, horizon, t)
  local jk = k_job(id)
  local h = redis.call('HMGET', jk, 'state', 'key_id', 'work')
  if h[1] == 'QUEUED' then
    redis.call('ZREM', K_QUEUED, id)
    redis.call('SADD', K_PROCESSING, id)
    fair_served(id, h[2] or '', tonumber(h[3] or '1'))  -- a reclaimed job was charged at its first claim
  end
  if not entry then entry = next_ticket(worker, id) end
  redis.call('HSET', K_TICKETS, entry, id)
  redis.call('HSET', jk, 'entry', entry, 'state', 'PROCESSING', 'lease_token', token, 'lease_worker', worker,
    'lease_until', num(t + lease_ms / 1000), 'lease_ms', num(lease_ms), 'started_at', num(t), 'step', 0,
    'phase', '')
  redis.call('HINCRBY', jk, 'deliveries', 1)
  -- a reclaim is two changes: back to QUEUED when the lease ran out (as readers saw it), then claimed
  redis.call('HINCRBY', jk, 'version', h[1] == 'PROCESSING' and 2 or 1)
  redis.call('XCLAIM', K_STREAM, K_GROUP, worker, 0, entry, 'IDLE', idle_for(lease_ms, horizon), 'JUSTID')
  outbox(id, 'start', t)
  publish(id)
  return with_status('ok', redis.call('HGETALL', jk))
end
-- a job whose worker stopped renewing its lease: one more delivery, or dead after max_deliveries
local function reclaim(id, entry, state, deliveries, worker, token, lease_ms, horizon, max_deliveries, t)
  if state == 'PROCESSING' then redis.call('HINCRBY', K_COUNTERS, F_RECLAIMS, 1) end
  if deliveries >= max_deliveries then
    local reason = 'worker lost ' .. deliveries .. ' times'
    -- back to QUEUED when the lease ran out, as readers saw it (`as_seen`): one change
    if state == 'PROCESSING' then redis.call('HINCRBY', k_job(id), 'version', 1) end
    fail_job(id, reason, t)
    redis.call('XADD', K_DEAD, 'MAXLEN', '~', 10000, '*', 'job', id, 'reason', reason, 'at', num(t))
    redis.call('HINCRBY', K_COUNTERS, F_DEAD, 1)
    return {'none'}
  end
  return take(id, entry, worker, token, lease_ms, horizon, t)
end
"""

_LUA_BODIES: dict[str, str] = {
    # ARGV: id, queue_cap, key_id or '', cost, model, params, idempotency_key, webhook JSON, request hash,
    # work (fair.work)
    names.SCRIPT_SUBMIT: f"local IDEM_TTL = {IDEMPOTENCY_SECONDS}\n" + r"""
local id, kid, cost = ARGV[3], ARGV[5], tonumber(ARGV[6])
local jk = k_job(id)
local idem = nil
if ARGV[9] ~= '' then
  idem = k_idem(kid, ARGV[9])
  local first = redis.call('GET', idem)
  if first then
    first = cjson.decode(first)
    if first.hash ~= ARGV[11] then return {'idem_mismatch'} end
    return with_status('replay', {first.job, unpack(redis.call('HGETALL', k_job(first.job)))})
  end
end
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
    local have, need = micro(key[1]), micro(cost)
    if have < need then return {'funds', num(cost), credits(have)} end
    redis.call('HSET', k_key(kid), 'credits', credits(have - need))
  end
  -- unlimited keys get the entry too (their usage), without a balance to move
  ledger(kid, id, 'reserve', -micro(cost) / MICRO, t)
  reserved = '1'
end
if redis.call('EXISTS', K_STREAM) == 0 then
  redis.call('XGROUP', 'CREATE', K_STREAM, K_GROUP, '0', 'MKSTREAM')
end
local seq = redis.call('INCR', K_SEQ)
redis.call('XADD', K_STREAM, '*', 'job', id)  -- its ticket: one more unread entry
redis.call('HSET', jk, 'id', id, 'model', ARGV[7], 'params', ARGV[8], 'state', 'QUEUED', 'cost', ARGV[6],
  'created_at', num(t), 'step', 0, 'total_steps', 0, 'outputs', 0, 'ext', '', 'seeds', '[]',
  'metrics', '{}', 'deliveries', 0, 'cancel_requested', 0, 'version', 1, 'seq', seq, 'reserved', reserved)
if kid ~= '' then
  redis.call('HSET', jk, 'key_id', kid)
  redis.call('INCR', k_running(kid))
  redis.call('ZADD', k_history(kid), seq, id)
end
if ARGV[9] ~= '' then redis.call('HSET', jk, 'idempotency_key', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', jk, 'webhook', ARGV[10]) end
redis.call('ZADD', K_QUEUED, seq, id)
fair_enqueue(id, kid, tonumber(ARGV[12]))
if idem then redis.call('SET', idem, cjson.encode({job = id, hash = ARGV[11]}), 'EX', IDEM_TTL) end
return with_status('ok', redis.call('HGETALL', jk))
""",
    # ARGV: id, token, lease_ms, horizon_ms
    names.SCRIPT_HEARTBEAT: r"""
local jk, lease_ms = k_job(ARGV[3]), tonumber(ARGV[5])
local h = redis.call('HMGET', jk, 'state', 'lease_token', 'lease_worker', 'entry', 'lease_until')
if not holds(h[1], h[2], h[5], ARGV[4]) then return 0 end
redis.call('HSET', jk, 'lease_until', num(now() + lease_ms / 1000), 'lease_ms', num(lease_ms))
redis.call('XCLAIM', K_STREAM, K_GROUP, h[3], 0, h[4], 'IDLE', idle_for(lease_ms, tonumber(ARGV[6])),
  'JUSTID')
return 1
""",
    # ARGV: id, token, step, total_steps, phase[, preview webp]
    names.SCRIPT_PROGRESS: r"""
local jk = k_job(ARGV[3])
local h = redis.call('HMGET', jk, 'state', 'lease_token', 'cancel_requested', 'lease_until')
if not holds(h[1], h[2], h[4], ARGV[4]) then return 0 end
redis.call('HSET', jk, 'step', ARGV[5], 'total_steps', ARGV[6], 'phase', ARGV[7])
if ARGV[8] then
  -- the latest preview, written before the change is published (a woken watcher finds it)
  local pk = k_preview(ARGV[3])
  redis.call('HSET', pk, 'step', ARGV[5], 'data', ARGV[8])
  redis.call('PEXPIRE', pk, math.max(1, math.ceil(RETENTION * 1000)))
end
redis.call('HINCRBY', jk, 'version', 1)
outbox(ARGV[3], 'progress', now())
publish(ARGV[3])
-- 1: held; + 2: a cancel was requested; + 4: someone watches the previews
local ack = 1
if h[3] == '1' then ack = ack + 2 end
if redis.call('EXISTS', k_watch(ARGV[3])) == 1 then ack = ack + 4 end
return ack
""",
    # ARGV: id, token, ext, seeds, metrics, blob dir name or '', n, image 0 … image n-1 (when no blob).
    # Returns 0 (stale lease), 1 (COMPLETED) or 2 (a cancel came first: FAILED "cancelled").
    names.SCRIPT_COMPLETE: r"""
local id = ARGV[3]
local h = redis.call('HMGET', k_job(id), 'state', 'lease_token', 'key_id', 'cost', 'total_steps',
  'cancel_requested', 'lease_until')
if not holds(h[1], h[2], h[7], ARGV[4]) then return 0 end
if h[6] == '1' then
  -- a cancel acknowledged before this completion wins: FAILED "cancelled", refunded
  fail_job(id, 'cancelled', now())
  return 2
end
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
outbox(id, 'completed', t)
publish(id)
return 1
""",
    # ARGV: id, token, error
    names.SCRIPT_FAIL: r"""
local h = redis.call('HMGET', k_job(ARGV[3]), 'state', 'lease_token', 'lease_until')
if not holds(h[1], h[2], h[3], ARGV[4]) then return 0 end
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
if redis.call('EXISTS', kk) == 0 then return {'none'} end
local new = nil
if ARGV[4] == 'add' then
  -- checked here, in the script that writes it: no submit can come between
  new = micro(redis.call('HGET', kk, 'credits') or '0') + micro(ARGV[5])
  if new < 0 or new > MAX_MICRO then return {'range', credits(new)} end
elseif ARGV[4] == 'set' and ARGV[5] ~= '' then
  new = micro(ARGV[5])
end
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
  if new == nil then
    redis.call('HDEL', kk, 'credits')
  else
    redis.call('HSET', kk, 'credits', credits(new))
    -- the entry brings the ledger's sum to the new balance (also after a time without a limit,
    -- when usage entries moved no balance)
    local sum = 0
    for _, raw in ipairs(redis.call('LRANGE', k_ledger(ARGV[3]), 0, -1)) do
      sum = sum + micro(cjson.decode(raw).amount)
    end
    ledger(ARGV[3], '', 'topup', (new - sum) / MICRO, now())
  end
end
return with_status('ok', redis.call('HGETALL', kk))
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

_BODIES = _LUA_BODIES | FAIR_BODIES | HOOK_BODIES
SCRIPTS = {name: names.LUA_KEYS + _LUA_COMMON + body for name, body in _BODIES.items()}
assert set(SCRIPTS) == set(names.SCRIPT_NAMES)
