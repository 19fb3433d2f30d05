"""Every Redis key, channel and Lua script name of the Redis job store, in one place.

All names start with the store's prefix (default ``kolors:``), so several deployments (or test
runs) can share one Redis. Python builds names through `Keys`; the Lua scripts build the names
they discover at run time (a job id from a queue, the key id read from a job) through
`LUA_KEYS`, which is generated from the same constants, so the two cannot drift apart.

| name | type | holds |
| --- | --- | --- |
| ``fair-queue:{key id}`` | zset id → odometer | that key's QUEUED jobs, first in, first out: the queue |
| ``fair-active`` | zset key id → start tag | keys with queued jobs, by virtual time (`fair.py`; ``""`` = no key) |
| ``fair`` | hash | ``vtime``, ``queued``, ``seq``, ``company``, ``lease_min``, ``n_exact``, ``idle``; per key |
| | | ``finish:``, ``odo:``, ``n:``, ``w:``, ``r:``, ``lim:`` (see `redis_fair.py`) |
| ``leases`` | zset id → lease deadline | PROCESSING jobs by their lease's deadline (a claim takes lapsed ones first) |
| ``wake`` | list | one entry per sleeping worker a submit came for (``fair`` ``idle``): they BLPOP it |
| ``dead-letters`` | stream (capped) | ``{job, reason, at}`` of jobs lost too many times |
| ``seq`` | counter | the layout before: ``fair``'s ``seq`` (submission sequence) starts from it |
| ``counters`` | hash | ``reclaims``, ``dead_letters`` |
| ``expiring`` | zset ``[id, key id]`` → expires_at | finished jobs, for `expire()` |
| ``workers`` | zset worker id → alive until | liveness |
| ``secret`` | string | the shared secret that signs output URLs |
| ``job:{id}`` | hash | the job (`JOB_FIELDS`), image i as ``out:{i}`` (no blob store); swept past ``expires_at`` |
| ``out:{id}:{i}`` | string | output image i of a job the layout before stored (now ``job:{id}`` ``out:{i}``) |
| ``in:{id}`` | hash sha256 → bytes | the job's input pictures (when no blob store); deleted by `expire()` |
| ``running:{key id}`` | counter | the layout before: moved into ``fair`` ``r:{key id}`` on `open` |
| ``history:{key id}`` | zset id → seq | that key's jobs |
| ``ledger:{key id}`` | list of JSON | that key's credit movements |
| ``key:{key id}`` | hash | the API key record |
| ``key-index`` | hash key_hash → key id | lookup by presented key |
| ``keys`` | zset key id → created_at | keys in creation order |
| ``events:{id}`` | pub/sub channel | the job's version, on each change while it is ``watched`` (see `wait`) |
| ``submitted`` | pub/sub channel | every submit: what workers waiting for company listen to |
| ``hooks-new`` | pub/sub channel | every webhook delivery made: what idle delivery runners listen to |
| ``keys-changed`` | pub/sub channel | the id of every key record changed (`redis_apikeys.py`) |
| ``idem:{key id}:{key}`` | string, TTL 24 h | an Idempotency-Key: ``{job, hash}`` of its first request |
| ``hook-dests`` | zset destination → due time | destinations with pending deliveries, by the earliest |
| ``hooks-due:{destination}`` | zset delivery id → due time | its pending deliveries (a claim: one lease ahead) |
| ``hook:{delivery id}`` | hash | one webhook delivery: job, event, url, state, attempts, token |
| ``hook-log:{id}`` | list of JSON | the job's webhook attempts |
| ``webhook-secrets`` | hash key id → ``whsec_…`` | each API key's webhook signing secret |
| ``preview:{id}`` | hash ``step``, ``data`` | the job's latest preview (webp); TTL = retention from its write |

KEDA scales on the API's `/metrics` (`kolors_queue_depth`, `kolors_jobs_processing`: `stats`), not on
Redis keys. The names of the layout before this one (a stream of tickets) are in `redis_migrate.py`,
which moves what they hold over once.
"""

from __future__ import annotations

#: The default prefix of every name.
DEFAULT_PREFIX = "kolors:"

# -- fixed names (appended to the prefix)
DEAD_LETTERS = "dead-letters"
FAIR_ACTIVE = "fair-active"
FAIR = "fair"
LEASES = "leases"
WAKE = "wake"
SEQ = "seq"
COUNTERS = "counters"
EXPIRING = "expiring"
WORKERS = "workers"
SECRET = "secret"  # noqa: S105 - a key name, not a secret
KEY_INDEX = "key-index"
KEY_LIST = "keys"
HOOK_DESTS = "hook-dests"
WEBHOOK_SECRETS = "webhook-secrets"  # noqa: S105 - a key name, not a secret

# -- per-id names (prefix + stem + id)
JOB = "job:"
OUTPUT = "out:"
INPUT = "in:"
RUNNING = "running:"
HISTORY = "history:"
LEDGER = "ledger:"
KEY = "key:"
EVENTS = "events:"
SUBMITTED = "submitted"  # a pub/sub channel
KEYS_CHANGED = "keys-changed"  # a pub/sub channel
HOOKS_NEW = "hooks-new"  # a pub/sub channel
IDEM = "idem:"
HOOK = "hook:"
HOOK_LOG = "hook-log:"
PREVIEW = "preview:"
WATCH = "watch:"  # someone watches the job's previews (a string with a TTL)
FAIR_QUEUE = "fair-queue:"
DEST_DUE = "hooks-due:"

#: The fields of a job hash that readers get: all but the images (``out:{i}``, read one at a time).
JOB_FIELDS = (
    "id", "model", "params", "state", "created_at", "key_id", "cost", "started_at", "finished_at", "step",
    "total_steps", "error", "outputs", "ext", "seeds", "metrics", "deliveries", "cancel_requested", "version",
    "expires_at", "phase", "lease_until", "lease_token", "lease_worker", "blob", "inline", "idempotency_key",
    "webhook", "seq", "reserved", "work", "odo", "watched", "watch_until", "hook_stopped", "hook_progress",
    "hook_progress_n",
)

# -- fields of the COUNTERS hash
RECLAIMS = "reclaims"
DEAD_LETTER_COUNT = "dead_letters"
#: The field of the FAIR hash that counts QUEUED jobs (changed with the fair queue, in one HSET).
QUEUED_COUNT = "queued"
#: The field of the FAIR hash that bounds every lease's deadline from below (absent: unknown).
LEASE_MIN = "lease_min"
#: The field of the FAIR hash that says its per-key queued counts (``n:{key id}``) are exact.
N_EXACT = "n_exact"
#: The field of the FAIR hash that counts the workers asleep on WAKE that no wake-up was pushed for.
IDLE = "idle"

# -- the Lua scripts, by name (their sources are in redis.py)
SCRIPT_SUBMIT = "submit"
SCRIPT_CLAIM = "claim"
SCRIPT_CLAIM_BATCH = "claim_batch"
SCRIPT_POSITION = "position"
SCRIPT_HEARTBEAT = "heartbeat"
SCRIPT_PROGRESS = "progress"
SCRIPT_COMPLETE = "complete"
SCRIPT_FAIL = "fail"
SCRIPT_CANCEL = "cancel"
SCRIPT_EXPIRE = "expire"
SCRIPT_ADD_KEY = "add_key"
SCRIPT_UPDATE_KEY = "update_key"
SCRIPT_DELETE_KEY = "delete_key"
SCRIPT_KEY_BY_HASH = "key_by_hash"
SCRIPT_WORKER_ALIVE = "worker_alive"
SCRIPT_STATS = "stats"
SCRIPT_RUNNING = "running"
SCRIPT_WATCH = "watch"
SCRIPT_MARK = "mark"
SCRIPT_COMPANY = "company"
SCRIPT_HOOK_CLAIM = "hook_claim"
SCRIPT_HOOK_RECORD = "hook_record"
SCRIPT_NAMES = (
    SCRIPT_SUBMIT, SCRIPT_CLAIM, SCRIPT_CLAIM_BATCH, SCRIPT_POSITION, SCRIPT_HEARTBEAT,
    SCRIPT_PROGRESS, SCRIPT_COMPLETE, SCRIPT_FAIL, SCRIPT_CANCEL, SCRIPT_EXPIRE, SCRIPT_ADD_KEY, SCRIPT_UPDATE_KEY,
    SCRIPT_DELETE_KEY, SCRIPT_KEY_BY_HASH, SCRIPT_WORKER_ALIVE, SCRIPT_STATS, SCRIPT_RUNNING, SCRIPT_WATCH,
    SCRIPT_MARK, SCRIPT_COMPANY,
    SCRIPT_HOOK_CLAIM,
    SCRIPT_HOOK_RECORD,
)


def glob_escape(text: str) -> str:
    """Escape the glob characters of SCAN MATCH and PSUBSCRIBE patterns."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Keys:
    """The names of one store, for Python code."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.dead_letters = prefix + DEAD_LETTERS
        self.fair_active = prefix + FAIR_ACTIVE
        self.fair = prefix + FAIR
        self.leases = prefix + LEASES
        self.wake = prefix + WAKE
        self.seq = prefix + SEQ
        self.counters = prefix + COUNTERS
        self.expiring = prefix + EXPIRING
        self.workers = prefix + WORKERS
        self.secret = prefix + SECRET
        self.key_index = prefix + KEY_INDEX
        self.key_list = prefix + KEY_LIST
        self.hook_dests = prefix + HOOK_DESTS
        self.webhook_secrets = prefix + WEBHOOK_SECRETS
        #: Matches every name of this store (SCAN MATCH).
        self.everything = glob_escape(prefix) + "*"
        self.submitted = prefix + SUBMITTED
        self.keys_changed = prefix + KEYS_CHANGED
        self.hooks_new = prefix + HOOKS_NEW
        #: Matches every job's event channel (PSUBSCRIBE).
        self.events_pattern = glob_escape(prefix + EVENTS) + "*"

    def job(self, job_id: str) -> str:
        return self.prefix + JOB + job_id

    def dest_due(self, destination: str) -> str:
        return self.prefix + DEST_DUE + destination

    def fair_queue(self, key_id: str) -> str:
        return self.prefix + FAIR_QUEUE + key_id

    def preview(self, job_id: str) -> str:
        return self.prefix + PREVIEW + job_id

    def watch(self, job_id: str) -> str:
        return self.prefix + WATCH + job_id

    def output(self, job_id: str, index: int) -> str:
        return f"{self.prefix}{OUTPUT}{job_id}:{index}"

    def input(self, job_id: str) -> str:
        return f"{self.prefix}{INPUT}{job_id}"

    def running(self, key_id: str) -> str:
        return self.prefix + RUNNING + key_id

    def history(self, key_id: str) -> str:
        return self.prefix + HISTORY + key_id

    def ledger(self, key_id: str) -> str:
        return self.prefix + LEDGER + key_id

    def key(self, key_id: str) -> str:
        return self.prefix + KEY + key_id

    def idempotency(self, key_id: str, idempotency_key: str) -> str:
        return f"{self.prefix}{IDEM}{key_id}:{idempotency_key}"

    def hook_log(self, job_id: str) -> str:
        return self.prefix + HOOK_LOG + job_id

    def events(self, job_id: str) -> str:
        return self.prefix + EVENTS + job_id

    def job_id_of_channel(self, channel: str) -> str | None:
        stem = self.prefix + EVENTS
        return channel[len(stem):] if channel.startswith(stem) else None


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The same names for Lua; every script starts with this and receives the prefix as ARGV[1].
LUA_KEYS = "\n".join([
    "local P = ARGV[1]",
    f"local K_DEAD = P .. {_lua_string(DEAD_LETTERS)}",
    f"local K_FAIR_ACTIVE = P .. {_lua_string(FAIR_ACTIVE)}",
    f"local K_FAIR = P .. {_lua_string(FAIR)}",
    f"local K_LEASES = P .. {_lua_string(LEASES)}",
    f"local K_WAKE = P .. {_lua_string(WAKE)}",
    f"local K_SUBMITTED = P .. {_lua_string(SUBMITTED)}",
    f"local K_KEYS_CHANGED = P .. {_lua_string(KEYS_CHANGED)}",
    f"local K_HOOKS_NEW = P .. {_lua_string(HOOKS_NEW)}",
    f"local K_SEQ = P .. {_lua_string(SEQ)}",
    f"local K_COUNTERS = P .. {_lua_string(COUNTERS)}",
    f"local K_EXPIRING = P .. {_lua_string(EXPIRING)}",
    f"local K_WORKERS = P .. {_lua_string(WORKERS)}",
    f"local K_KEY_INDEX = P .. {_lua_string(KEY_INDEX)}",
    f"local K_KEY_LIST = P .. {_lua_string(KEY_LIST)}",
    f"local K_HOOK_DESTS = P .. {_lua_string(HOOK_DESTS)}",
    f"local F_RECLAIMS = {_lua_string(RECLAIMS)}",
    f"local F_DEAD = {_lua_string(DEAD_LETTER_COUNT)}",
    f"local F_QUEUED = {_lua_string(QUEUED_COUNT)}",
    f"local F_LEASE_MIN = {_lua_string(LEASE_MIN)}",
    f"local F_N_EXACT = {_lua_string(N_EXACT)}",
    f"local F_IDLE = {_lua_string(IDLE)}",
    "local JOB_FIELDS = {" + ", ".join(_lua_string(f) for f in JOB_FIELDS) + "}",
    f"local function k_job(id) return P .. {_lua_string(JOB)} .. id end",
    f"local function k_output(id, i) return P .. {_lua_string(OUTPUT)} .. id .. ':' .. i end",
    f"local function k_running(kid) return P .. {_lua_string(RUNNING)} .. kid end",
    f"local function k_history(kid) return P .. {_lua_string(HISTORY)} .. kid end",
    f"local function k_ledger(kid) return P .. {_lua_string(LEDGER)} .. kid end",
    f"local function k_key(kid) return P .. {_lua_string(KEY)} .. kid end",
    f"local function k_idem(kid, key) return P .. {_lua_string(IDEM)} .. kid .. ':' .. key end",
    f"local function k_hook(id) return P .. {_lua_string(HOOK)} .. id end",
    f"local function k_hook_log(id) return P .. {_lua_string(HOOK_LOG)} .. id end",
    f"local function k_events(id) return P .. {_lua_string(EVENTS)} .. id end",
    f"local function k_preview(id) return P .. {_lua_string(PREVIEW)} .. id end",
    f"local function k_watch(id) return P .. {_lua_string(WATCH)} .. id end",
    f"local function k_fair_queue(kid) return P .. {_lua_string(FAIR_QUEUE)} .. kid end",
    f"local function k_dest_due(dest) return P .. {_lua_string(DEST_DUE)} .. dest end",
    "",
])
