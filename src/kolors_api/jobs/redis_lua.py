"""The Lua scripts of the Redis job store: one script per state change (see `redis.py`).

Each script is `redis_keys.LUA_KEYS` (the key names) + `_LUA_COMMON` (shared helpers) + its body.
"""

from __future__ import annotations

from kolors_api.jobs import redis_keys as names
from kolors_api.jobs.base import IDEMPOTENCY_SECONDS, MAX_CREDITS, MICRO
from kolors_api.jobs.redis_fair import BODIES as FAIR_BODIES
from kolors_api.jobs.redis_fair import LUA_CLAIM, LUA_FAIR
from kolors_api.jobs.redis_hooks import HOOK_BODIES, LUA_OUTBOX

# ARGV[1] is the prefix (see redis_keys.LUA_KEYS), ARGV[2] the retention and the time; a script's own
# arguments start at ARGV[3].
_LUA_COMMON = f"""
local MICRO, MAX_MICRO = {MICRO}, {int(MAX_CREDITS * MICRO)}
""" + r"""
-- ARGV[2]: "RETENTION NOW", the retention in seconds and the server's clock when the script was sent
-- (the one clock of the fleet, as the caller reads it: `redis_clock.py`)
local RETENTION, T = string.match(ARGV[2], '^(%S+) (%S+)$')
RETENTION, T = tonumber(RETENTION), tonumber(T)
local function now() return T end
local function num(x) return string.format('%.17g', x) end
-- fields `names` of job `id` as a table (an absent field: false), in one HMGET
local function fields(id, names)
  local v = redis.call('HMGET', k_job(id), unpack(names))
  local j = {}
  for i, n in ipairs(names) do j[n] = v[i] end
  return j
end
-- the fields the webhook outbox reads (see `outbox`), `watched` (see `publish`) and `uncounted` (see `finish`)
local HOOK_FIELDS = {'webhook', 'key_id', 'hook_stopped', 'hook_progress', 'watched', 'uncounted'}
local function with_hooks(names)
  local out = {unpack(names)}
  for _, n in ipairs(HOOK_FIELDS) do table.insert(out, n) end
  return out
end
-- the lease `token` still holds: the job is PROCESSING under it and its deadline has not passed (past
-- it, every reader sees the job QUEUED again, and the next claim takes it)
local function holds(j, token)
  return j.state == 'PROCESSING' and j.lease_token == token and (tonumber(j.lease_until) or 0) >= now()
end
-- credits move as integer micro-credits (exact in a double below 2^53; see base.MAX_CREDITS)
local function micro(x) return math.floor(tonumber(x) * MICRO + 0.5) end
local function credits(u) return num(u / MICRO) end
local function with_status(status, list)
  table.insert(list, 1, status)
  return list
end
-- the change `version` of job `id` on its channel, when someone waits on it (`j.watched`: see SCRIPT_MARK);
-- `progress`: only its progress changed ("VERSION progress"), which a waiter for its end sleeps through
local function publish(id, version, j, progress)
  if (tonumber(j.watched) or 0) > now() then
    redis.call('PUBLISH', k_events(id), progress and (version .. ' progress') or version)
  end
end
local function ledger(kid, rid, kind, amount, at)
  redis.call('RPUSH', k_ledger(kid),
    cjson.encode({request_id = rid, kind = kind, amount = num(amount), at = num(at)}))
end
""" + LUA_OUTBOX + LUA_FAIR + r"""
-- COMPLETED or FAILED as change `version`: leave the queue or the leases, release the key's slot (``r:``),
-- and expire `RETENTION` from now. `j`: the job's state and key_id.
local function finish(id, j, version, fields, t)
  local jk = k_job(id)
  local exp = t + RETENTION
  redis.call('HSET', jk, 'finished_at', num(t), 'expires_at', num(exp), 'lease_token', '', 'lease_until', '',
    'version', version, unpack(fields))
  if j.state == 'QUEUED' then fair_left(id, j.key_id or '') else redis.call('ZREM', K_LEASES, id) end
  -- (a job of a key without max_concurrency was not counted: `uncounted`)
  if j.key_id and j.uncounted ~= '1' and redis.call('HINCRBY', K_FAIR, 'r:' .. j.key_id, -1) < 0 then
    redis.call('HSET', K_FAIR, 'r:' .. j.key_id, 0)  -- (never below 0)
  end
  -- past `expires_at` readers find no job (`redis_codec.live`); the expiry sweep deletes it (`expire`)
  redis.call('ZADD', K_EXPIRING, num(exp), cjson.encode({id, j.key_id or ''}))
end
local FAIL_FIELDS = with_hooks({'state', 'cost', 'reserved', 'version'})
-- FAILED with `err`, refunded; `j` (FAIL_FIELDS) when read already; `skipped`: changes readers saw
-- before this one (a lapsed lease read as QUEUED: 1)
local function fail_job(id, err, t, j, skipped)
  j = j or fields(id, FAIL_FIELDS)
  local version = tonumber(j.version or '0') + 1 + (skipped or 0)
  finish(id, j, version, {'state', 'FAILED', 'error', err}, t)
  outbox(id, 'failed', t, j)
  local kid, cost = j.key_id, tonumber(j.cost or '0')
  if kid and cost ~= 0 and j.reserved == '1' then
    local have = redis.call('HGET', k_key(kid), 'credits')
    if have then redis.call('HSET', k_key(kid), 'credits', credits(micro(have) + micro(cost))) end
    ledger(kid, id, 'refund', micro(cost) / MICRO, t)
  end
  publish(id, version, j)
end
-- job `id`'s hash as readers get it (flat), without its images (``out:{i}``)
local function readable(id)
  local v = redis.call('HMGET', k_job(id), unpack(JOB_FIELDS))
  local out = {}
  for i, n in ipairs(JOB_FIELDS) do
    if v[i] then
      table.insert(out, n)
      table.insert(out, v[i])
    end
  end
  return out
end
-- the whole hash of job `id` as a table (what a claim reads of a job it may take, or dead-letter)
local function whole(id)
  local v = redis.call('HGETALL', k_job(id))
  local j = {}
  for i = 1, #v, 2 do j[v[i]] = v[i + 1] end
  return j
end
-- lease job `id` (`j`: its `whole` hash) to `worker` until `lease_ms` from now; `q`: what the claim knows
-- of its key (`fair_served`), or nil. Returns the job's hash as written (flat).
local function take(id, j, worker, token, lease_ms, t, q)
  local jk = k_job(id)
  local lease_until = t + lease_ms / 1000
  if j.state == 'QUEUED' then  -- a reclaimed job was charged at its first claim
    fair_served(id, j.key_id or '', tonumber(j.work or '1'), lease_until, q)
  end
  -- a reclaim is two changes: back to QUEUED when the lease ran out (as readers saw it), then claimed
  local version = tonumber(j.version or '0') + (j.state == 'PROCESSING' and 2 or 1)
  local set = {'state', 'PROCESSING', 'lease_token', token, 'lease_worker', worker,
    'lease_until', num(lease_until), 'started_at', num(t), 'step', '0', 'phase', '',
    'deliveries', tostring(tonumber(j.deliveries or '0') + 1), 'version', tostring(version)}
  redis.call('HSET', jk, unpack(set))
  redis.call('ZADD', K_LEASES, num(lease_until), id)
  outbox(id, 'start', t, j)
  publish(id, version, j)
  for i = 1, #set, 2 do j[set[i]] = set[i + 1] end
  local flat = {}
  for k, v in pairs(j) do
    table.insert(flat, k)
    table.insert(flat, v)
  end
  return flat
end
""" + LUA_CLAIM

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
    return with_status('replay', {first.job, unpack(readable(first.job))})
  end
end
local f = fair_submit_fields(kid)
local cap = tonumber(ARGV[4])
if cap > 0 then
  local queued = tonumber(f.queued or '0')
  if queued >= cap then return {'queue_full', queued} end
end
local t = now()
local seq = fair_seq(f)
local reserved, key = '0', nil
local need, have = micro(cost), nil
if kid ~= '' then
  -- the key's credits and max_concurrency: not read when ``fair`` says it has neither
  key = {weight = f.w or '1', lim = f.lim}
  if f.lim ~= '0' or not f.w then
    local k = redis.call('HMGET', k_key(kid), 'credits', 'max_concurrency', 'weight')
    key = {weight = k[3] or '1', lim = (k[1] or k[2]) and '1' or '0', credits = k[1], most = k[2]}
  end
  if key.most and tonumber(f.r or '0') >= tonumber(key.most) then return {'too_many', key.most} end
  if key.credits then
    have = micro(key.credits)
    if have < need then return {'funds', num(cost), credits(have)} end
  end
  -- the first write: the key's history says whether the id is taken (a job id of another key: random 128
  -- bits, never taken)
  if redis.call('ZADD', k_history(kid), 'NX', seq, id) == 0 then return {'exists'} end
  if have then redis.call('HSET', k_key(kid), 'credits', credits(have - need)) end
  -- unlimited keys get the entry too (their usage), without a balance to move
  ledger(kid, id, 'reserve', -need / MICRO, t)
  reserved = '1'
elseif redis.call('EXISTS', jk) == 1 then
  return {'exists'}
end
local work = tonumber(ARGV[12])
local odo, company, sleeper = fair_enqueue(id, kid, work, f, key)
local job = {'id', id, 'model', ARGV[7], 'params', ARGV[8], 'state', 'QUEUED', 'cost', ARGV[6],
  'created_at', num(t), 'step', '0', 'total_steps', '0', 'outputs', '0', 'ext', '', 'seeds', '[]',
  'metrics', '{}', 'deliveries', '0', 'cancel_requested', '0', 'version', '1', 'seq', tostring(seq),
  'reserved', reserved, 'work', num(work), 'odo', num(odo)}
if kid ~= '' then
  table.insert(job, 'key_id')
  table.insert(job, kid)
  if not key.most then  -- (not in its key's count of unfinished jobs, ``r:``: nothing bounds it)
    table.insert(job, 'uncounted')
    table.insert(job, '1')
  end
end
if ARGV[9] ~= '' then
  table.insert(job, 'idempotency_key')
  table.insert(job, ARGV[9])
end
if ARGV[10] ~= '' then
  table.insert(job, 'webhook')
  table.insert(job, ARGV[10])
end
redis.call('HSET', jk, unpack(job))
-- a sleeping worker wakes (one no wake-up was pushed for yet: `fair_enqueue`); busy ones find it themselves
if sleeper then redis.call('RPUSH', K_WAKE, '1') end
-- and those waiting for company look again (`wait_for_work` marks ``company``)
if company then redis.call('PUBLISH', K_SUBMITTED, id) end
if idem then redis.call('SET', idem, cjson.encode({job = id, hash = ARGV[11]}), 'EX', IDEM_TTL) end
return with_status('ok', job)
""",
    # ARGV: id, token, lease_ms
    names.SCRIPT_HEARTBEAT: r"""
local id, lease_ms = ARGV[3], tonumber(ARGV[5])
local j = fields(id, {'state', 'lease_token', 'lease_until'})
if not holds(j, ARGV[4]) then return 0 end
local lease_until = num(now() + lease_ms / 1000)
redis.call('HSET', k_job(id), 'lease_until', lease_until)
redis.call('ZADD', K_LEASES, lease_until, id)
-- (a renewal shorter than the lease it renews may end before ``lease_min``: it moves down too)
local bound = tonumber(redis.call('HGET', K_FAIR, F_LEASE_MIN) or '')
if bound and tonumber(lease_until) < bound then redis.call('HSET', K_FAIR, F_LEASE_MIN, lease_until) end
return 1
""",
    # ARGV: n, then n × (id, token, step, total_steps, phase, preview webp or ''). Returns each job's answer:
    # 0 the lease is lost (nothing stored); else 1 + 2 (a cancel was requested) + 4 (someone watches its previews)
    # + 8 (someone follows its changes: it is `watched`, or its webhook delivers progress)
    names.SCRIPT_PROGRESS: r"""
local out = {}
local i = 4
for r = 1, tonumber(ARGV[3]) do
  local id, token, step, total = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local phase, preview = ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  local j = fields(id, with_hooks({'state', 'lease_token', 'lease_until', 'cancel_requested', 'version',
    'watch_until'}))
  if not holds(j, token) then
    out[r] = 0
  else
    local version = tonumber(j.version) + 1
    redis.call('HSET', k_job(id), 'step', step, 'total_steps', total, 'phase', phase, 'version', version)
    if preview ~= '' then
      -- the latest preview, written before the change is published (a woken watcher finds it)
      local pk = k_preview(id)
      redis.call('HSET', pk, 'step', step, 'data', preview)
      redis.call('PEXPIRE', pk, math.max(1, math.ceil(RETENTION * 1000)))
    end
    outbox(id, 'progress', now(), j)
    publish(id, version, j, true)
    local ack = 1
    if j.cancel_requested == '1' then ack = ack + 2 end
    if (tonumber(j.watch_until) or 0) > now() then ack = ack + 4 end
    if (tonumber(j.watched) or 0) > now() or hook_wants(j, 'progress') then ack = ack + 8 end
    out[r] = ack
  end
end
return out
""",
    # ARGV: id, seconds
    names.SCRIPT_WATCH: r"""
local jk = k_job(ARGV[3])
if redis.call('EXISTS', jk) == 1 then redis.call('HSET', jk, 'watch_until', num(now() + tonumber(ARGV[4]))) end
return 1
""",
    # ARGV: id, seconds. Someone waits on the job's changes for `seconds`: they are published until then.
    # Returns {server time, the job's hash} (no hash: no job).
    names.SCRIPT_MARK: r"""
local jk = k_job(ARGV[3])
local h = readable(ARGV[3])
if h[1] then redis.call('HSET', jk, 'watched', num(now() + tonumber(ARGV[4]))) end
return {num(now()), h}
""",
    # ARGV: seconds. A worker waits for company: submits publish on ``submitted`` for `seconds`.
    names.SCRIPT_COMPANY: r"""
redis.call('HSET', K_FAIR, 'company', num(now() + tonumber(ARGV[3])))
return 1
""",
    # ARGV: id, token, ext, seeds, metrics, blob dir name or '', n, image 0 … image n-1 (when no blob).
    # Returns 0 (stale lease), 1 (COMPLETED) or 2 (a cancel came first: FAILED "cancelled").
    names.SCRIPT_COMPLETE: r"""
local id = ARGV[3]
local j = fields(id, with_hooks({'state', 'lease_token', 'lease_until', 'cost', 'reserved', 'total_steps',
  'cancel_requested', 'version'}))
if not holds(j, ARGV[4]) then return 0 end
if j.cancel_requested == '1' then
  -- a cancel acknowledged before this completion wins: FAILED "cancelled", refunded
  fail_job(id, 'cancelled', now(), j)
  return 2
end
local t, n = now(), tonumber(ARGV[9])
local fields = {'state', 'COMPLETED', 'outputs', n, 'ext', ARGV[5], 'seeds', ARGV[6], 'metrics', ARGV[7],
  'step', j.total_steps or '0'}
if ARGV[8] ~= '' then
  table.insert(fields, 'blob')
  table.insert(fields, ARGV[8])
else  -- the images in the job's hash (`inline`), under its TTL
  table.insert(fields, 'inline')
  table.insert(fields, '1')
  for k = 1, n do
    table.insert(fields, 'out:' .. (k - 1))
    table.insert(fields, ARGV[9 + k])
  end
end
local version = tonumber(j.version) + 1
finish(id, j, version, fields, t)
if j.key_id and tonumber(j.cost or '0') ~= 0 then ledger(j.key_id, id, 'capture', 0, t) end
outbox(id, 'completed', t, j)
publish(id, version, j)
return 1
""",
    # ARGV: id, token, error
    names.SCRIPT_FAIL: r"""
local j = fields(ARGV[3], with_hooks({'state', 'lease_token', 'lease_until', 'cost', 'reserved', 'version'}))
if not holds(j, ARGV[4]) then return 0 end
fail_job(ARGV[3], ARGV[5], now(), j)
return 1
""",
    # ARGV: id
    names.SCRIPT_CANCEL: r"""
local id = ARGV[3]
local jk = k_job(id)
local j = fields(id, FAIL_FIELDS)
if not j.state then return {'none'} end
if j.state == 'QUEUED' then
  fail_job(id, 'cancelled', now(), j)
elseif j.state == 'PROCESSING' then
  local version = tonumber(j.version) + 1
  redis.call('HSET', jk, 'cancel_requested', 1, 'version', version)
  publish(id, version, j)
end
return with_status('ok', readable(id))
""",
    # ARGV: batch size. Returns the ids of the jobs that went.
    names.SCRIPT_EXPIRE: r"""
local t = now()
local gone = {}
local due = redis.call('ZRANGEBYSCORE', K_EXPIRING, '-inf', num(t), 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local pair = cjson.decode(member)
  local id, kid = pair[1], pair[2]
  local h = redis.call('HMGET', k_job(id), 'outputs', 'inline')
  if h[2] ~= '1' then  -- (the layout before kept the images in keys of their own)
    for i = 1, tonumber(h[1] or '0') do redis.call('DEL', k_output(id, i - 1)) end
  end
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
redis.call('HDEL', K_FAIR, 'lim:' .. ARGV[3])  -- (its credits or max_concurrency may have changed)
for j = 7, #ARGV do
  if ARGV[j] == 'weight' then  -- (a field name: sets and deletes alike) the claims read fair's copy
    redis.call('HSET', K_FAIR, 'w:' .. ARGV[3], redis.call('HGET', kk, 'weight') or '1')
    break
  end
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
for j = 7, #ARGV do  -- max_concurrency set anew: its count of unfinished jobs starts from what is there
  if ARGV[j] == 'max_concurrency' then
    if redis.call('HEXISTS', kk, 'max_concurrency') == 1 then count_unfinished(ARGV[3], true) end
    break
  end
end
redis.call('PUBLISH', K_KEYS_CHANGED, ARGV[3])  -- processes that keep key records forget them
return with_status('ok', redis.call('HGETALL', kk))
""",
    # ARGV: id
    names.SCRIPT_DELETE_KEY: r"""
local kk = k_key(ARGV[3])
local key_hash = redis.call('HGET', kk, 'key_hash')
if not key_hash then return 0 end
redis.call('DEL', kk)
redis.call('HDEL', K_FAIR, 'w:' .. ARGV[3], 'lim:' .. ARGV[3])
redis.call('HDEL', K_KEY_INDEX, key_hash)
redis.call('ZREM', K_KEY_LIST, ARGV[3])
redis.call('PUBLISH', K_KEYS_CHANGED, ARGV[3])
return 1
""",
    # ARGV: key hash. The key record by the hash of the presented key, in one round trip (every request).
    names.SCRIPT_KEY_BY_HASH: r"""
local id = redis.call('HGET', K_KEY_INDEX, ARGV[3])
if not id then return {} end
return redis.call('HGETALL', k_key(id))
""",
    # ARGV: worker id, ttl seconds
    names.SCRIPT_WORKER_ALIVE: r"""
local ttl = tonumber(ARGV[4])
if ttl <= 0 then return redis.call('ZREM', K_WORKERS, ARGV[3]) end
return redis.call('ZADD', K_WORKERS, num(now() + ttl), ARGV[3])
""",
    # ARGV: key id. Its jobs not finished: ``r:`` for a key with max_concurrency, else counted.
    names.SCRIPT_RUNNING: r"""
local kid = ARGV[3]
if redis.call('HEXISTS', k_key(kid), 'max_concurrency') == 1 then
  return tonumber(redis.call('HGET', K_FAIR, 'r:' .. kid) or '0')
end
return count_unfinished(kid, false)
""",
    names.SCRIPT_STATS: r"""
local counters = redis.call('HMGET', K_COUNTERS, F_RECLAIMS, F_DEAD)
return {tonumber(redis.call('HGET', K_FAIR, F_QUEUED) or '0'), redis.call('ZCARD', K_LEASES),
  redis.call('ZCOUNT', K_WORKERS, '(' .. num(now()), '+inf'),
  tonumber(counters[1] or '0'), tonumber(counters[2] or '0')}
""",
}

_BODIES = _LUA_BODIES | FAIR_BODIES | HOOK_BODIES
SCRIPTS = {name: names.LUA_KEYS + _LUA_COMMON + body for name, body in _BODIES.items()}
assert set(SCRIPTS) == set(names.SCRIPT_NAMES)
