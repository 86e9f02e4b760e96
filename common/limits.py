"""Provider limits held across every worker process and machine, and the line jobs wait in.

Each limited provider has a *line*: a sorted set of the jobs its workers hold but have not started.
Only the head of the line may start, and only when every permit it needs is free — all taken in one
Lua script, timed by Redis ``TIME``, so any number of workers on any number of machines agree.

Per scope (the provider, and the model if it sets its own limits)::

    P:lim:<scope>:conc   zset  call id -> lease expiry (ms)  calls in flight; a dead worker's lease lapses
    P:lim:<scope>:rpm    zset  call id -> start (ms)         calls started in the last 60 s
    P:lim:<scope>:tpm    zset  call id -> start (ms)         token reservations of the last 60 s ...
    P:lim:<scope>:tok    hash  call id -> tokens, 'sum'      ... and their amounts

Per provider::

    P:lim:<provider>:line      zset  job id -> fair-queue finish tag
    P:lim:<provider>:vt        hash  'V' (tag of the last started job), 'k:<key>' (a key's last tag)
    P:lim:<provider>:owner     hash  job id -> worker process id (whose heartbeat proves it still waits)
    P:lim:<provider>:cooldown  key   set after an upstream 429; nobody starts until it expires
    P:lim:proc:<id>            key   a worker process's heartbeat
    P:lim:wake                 pubsub  the job id that just became head of its line

Guarantees (each stated where it is implemented):

* ``acquire``: all permits or none; rpm = calls started in any sliding 60 s window; tpm = tokens
  reserved in any sliding 60 s window (reservations are settled to the real count by ``release``,
  which also re-stamps the call's window entries with its end, so our window never frees a slot
  before the upstream's does).
* Fair share: a job's tag is ``max(V, last tag of its key) + 1/weight`` (start-time fair queueing), so
  jobs of one key start in arrival order, and a burst from one key is interleaved with the jobs of
  other keys instead of starving them: a job arriving while key A has n jobs waiting is overtaken by at
  most one job of each other key per turn of its own key (weight 1).
* A job that waits never consumes quota; a withdrawn or expired job leaves the line without starting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from common.jobs import Claim, JobStore
from common.registry import Limits

WINDOW_MS = 60_000
WAKE_CHANNEL_SUFFIX = "lim:wake"

# KEYS: line, vt, owner, cooldown, job, job_lease, [conc, rpm, tpm, tok] * n
# ARGV: job_id, execution, job_lease_ms, call_id, call_lease_ms, tokens, key, weight, proc_id, mode,
#       wake_channel, n, proc_key_prefix, [conc_limit, rpm_limit, tpm_limit] * n   (limit 0 = unlimited)
# -> {'run', attempt, queue_wait_s, spec, deadline, mode} | {'wait', rank, wait_ms} | {'expired'}
#    | {'gone', state} | {'too_large', tpm_limit}
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job_id, mode = ARGV[1], ARGV[10]
local n = tonumber(ARGV[12])

local job_prefix = string.sub(KEYS[5], 1, #KEYS[5] - #job_id)
local function proc_alive(proc)
  return proc and redis.call('EXISTS', ARGV[13] .. proc) == 1
end
local function head_is_valid(head)
  -- a head may start only if it is still waiting: queued (or re-waiting) and its worker alive
  local state = redis.call('HGET', job_prefix .. head, 'state')
  if state ~= 'queued' and state ~= 'running' then return false end
  return proc_alive(redis.call('HGET', KEYS[3], head))
end

local state = redis.call('HGET', KEYS[5], 'state')
if mode == 'claim' then
  if state == 'running' then
    if redis.call('EXISTS', KEYS[6]) == 1 then return {'gone', 'busy'} end
  elseif state ~= 'queued' then
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('HDEL', KEYS[3], job_id)
    return {'gone', state or 'missing'}
  end
  if state == 'queued' and now > tonumber(redis.call('HGET', KEYS[5], 'deadline')) * 1000 then
    redis.call('HSET', KEYS[5], 'state', 'expired', 'finished_at', string.format('%.6f', now / 1000))
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('HDEL', KEYS[3], job_id)
    return {'expired'}
  end
end

-- join the line (once): fair-queue tag
local V = tonumber(redis.call('HGET', KEYS[2], 'V') or '0')
if not redis.call('ZSCORE', KEYS[1], job_id) then
  local tag
  if mode == 'rewait' then
    tag = V - 1e-6                      -- back at the head: it already had its turn
  else
    local last = tonumber(redis.call('HGET', KEYS[2], 'k:' .. ARGV[7]) or '0')
    tag = math.max(V, last) + 1 / tonumber(ARGV[8])
    redis.call('HSET', KEYS[2], 'k:' .. ARGV[7], tag)
  end
  redis.call('ZADD', KEYS[1], tag, job_id)
end
redis.call('HSET', KEYS[3], job_id, ARGV[9])

-- drop heads that no longer wait (withdrawn, expired, or their worker died)
local head
for _ = 1, 20 do
  head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if head == nil or head == job_id or head_is_valid(head) then break end
  redis.call('ZREM', KEYS[1], head)
  redis.call('HDEL', KEYS[3], head)
end
if head ~= job_id then
  return {'wait', redis.call('ZRANK', KEYS[1], job_id), 0}
end

local cooldown = redis.call('PTTL', KEYS[4])
if cooldown > 0 then return {'wait', 0, cooldown} end

local tokens = tonumber(ARGV[6])
local wait = 0
for i = 0, n - 1 do
  local conc, rpm, tpm, tok = KEYS[7 + 4 * i], KEYS[8 + 4 * i], KEYS[9 + 4 * i], KEYS[10 + 4 * i]
  local conc_limit, rpm_limit, tpm_limit = tonumber(ARGV[14 + 3 * i]), tonumber(ARGV[15 + 3 * i]), tonumber(ARGV[16 + 3 * i])
  redis.call('ZREMRANGEBYSCORE', conc, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', rpm, '-inf', now - 60000)
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', tpm, '-inf', now - 60000)) do
    -- 0 - n, not -n: Lua formats -0 as '-0', which HINCRBY rejects (a refunded entry holds 0)
    redis.call('HINCRBY', tok, 'sum', 0 - tonumber(redis.call('HGET', tok, old) or '0'))
    redis.call('HDEL', tok, old)
  end
  redis.call('ZREMRANGEBYSCORE', tpm, '-inf', now - 60000)
  if conc_limit > 0 and redis.call('ZCARD', conc) >= conc_limit then
    wait = math.max(wait, 1000)   -- a release wakes the head sooner; this is the lapsed-lease fallback
  end
  if rpm_limit > 0 and redis.call('ZCARD', rpm) >= rpm_limit then
    local oldest = redis.call('ZRANGE', rpm, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + 60000 - now + 1)
  end
  if tpm_limit > 0 then
    if tokens > tpm_limit then return {'too_large', tpm_limit} end
    local sum = tonumber(redis.call('HGET', tok, 'sum') or '0')
    if sum + tokens > tpm_limit then
      local freed = 0
      local entries = redis.call('ZRANGE', tpm, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + tonumber(redis.call('HGET', tok, entries[j]) or '0')
        if sum - freed + tokens <= tpm_limit then
          wait = math.max(wait, tonumber(entries[j + 1]) + 60000 - now + 1)
          break
        end
      end
    end
  end
end
if wait > 0 then return {'wait', 0, wait} end

-- admitted: take every permit, leave the line, advance the virtual clock
for i = 0, n - 1 do
  local conc, rpm, tpm, tok = KEYS[7 + 4 * i], KEYS[8 + 4 * i], KEYS[9 + 4 * i], KEYS[10 + 4 * i]
  redis.call('ZADD', conc, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('ZADD', rpm, now, ARGV[4])
  redis.call('ZADD', tpm, now, ARGV[4])
  redis.call('HSET', tok, ARGV[4], tokens)
  redis.call('HINCRBY', tok, 'sum', tokens)
  for _, k in ipairs({conc, rpm, tpm, tok}) do redis.call('PEXPIRE', k, 120000 + tonumber(ARGV[5])) end
end
local tag = tonumber(redis.call('ZSCORE', KEYS[1], job_id))
if tag > V then redis.call('HSET', KEYS[2], 'V', tag) end
redis.call('ZREM', KEYS[1], job_id)
redis.call('HDEL', KEYS[3], job_id)
local next_head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if next_head then redis.call('PUBLISH', ARGV[11], next_head) end

if mode == 'rewait' then return {'run', 0, '0', '', '0', ''} end
redis.call('HSET', KEYS[5], 'state', 'running', 'started_at', string.format('%.6f', now / 1000))
local attempt = redis.call('HINCRBY', KEYS[5], 'attempts', 1)
redis.call('SET', KEYS[6], ARGV[2], 'PX', ARGV[3])
local job = redis.call('HMGET', KEYS[5], 'created_at', 'spec', 'deadline', 'mode')
return {'run', attempt, string.format('%.6f', now / 1000 - tonumber(job[1])), job[2], job[3], job[4]}
"""

# KEYS: line, [conc, rpm, tpm, tok] * n   ARGV: call_id, actual_tokens (-1 = keep), refund (1/0), wake, n
# The call's RPM/TPM entries are re-stamped with the release time: the upstream counted the call when
# it arrived there, after our admission, so a window that started at admission would free its slot
# before the upstream's does. Stamped at release, ours always frees later than the upstream's.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  local conc, rpm, tpm, tok = KEYS[2 + 4 * i], KEYS[3 + 4 * i], KEYS[4 + 4 * i], KEYS[5 + 4 * i]
  redis.call('ZREM', conc, ARGV[1])
  redis.call('ZADD', rpm, 'XX', now, ARGV[1])
  redis.call('ZADD', tpm, 'XX', now, ARGV[1])
  local reserved = redis.call('HGET', tok, ARGV[1])
  if reserved then
    local actual = tonumber(ARGV[2])
    if ARGV[3] == '1' then actual = 0 end
    if actual >= 0 then
      redis.call('HINCRBY', tok, 'sum', actual - tonumber(reserved))
      redis.call('HSET', tok, ARGV[1], actual)
    end
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if head then redis.call('PUBLISH', ARGV[4], head) end
return 1
"""

# KEYS: [conc] * n   ARGV: call_id, lease_ms
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, conc in ipairs(KEYS) do redis.call('ZADD', conc, 'XX', now + tonumber(ARGV[2]), ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Scope:
    """One set of limits and the Redis keys that count against it."""

    name: str
    limits: Limits


@dataclass(frozen=True)
class Attempt:
    outcome: str                  # run | wait | expired | gone | too_large
    claim: Claim | None = None
    rank: int = 0                 # position in line when waiting (0 = head)
    wait_ms: int = 0              # when the head may try again (0 = when woken)
    detail: str = ""


class Limiter:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.prefix = store.prefix
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)

    # keys ---------------------------------------------------------------------------------------
    def key(self, scope: str, kind: str) -> str:
        return f"{self.prefix}:lim:{scope}:{kind}"

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:{WAKE_CHANNEL_SUFFIX}"

    def proc_key(self, proc_id: str) -> str:
        return f"{self.prefix}:lim:proc:{proc_id}"

    def _scope_keys(self, scopes: list[Scope]) -> list[str]:
        return [self.key(s.name, kind) for s in scopes for kind in ("conc", "rpm", "tpm", "tok")]

    # operations ---------------------------------------------------------------------------------
    def heartbeat(self, proc_id: str, ttl_s: float) -> None:
        """This worker process is alive: the jobs it holds in lines keep their places."""
        self.redis.set(self.proc_key(proc_id), 1, px=int(ttl_s * 1000))

    def acquire(self, *, provider: str, scopes: list[Scope], job_id: str, execution: str, job_lease_s: float,
                call_id: str, call_lease_s: float, tokens: int, key: str, weight: float, proc_id: str,
                rewait: bool = False) -> Attempt:
        """Join the provider's line (once) and, if this job is its head and every scope has room,
        take all permits and claim the job — atomically. See the module docstring for guarantees."""
        keys = [self.key(provider, "line"), self.key(provider, "vt"), self.key(provider, "owner"),
                self.key(provider, "cooldown"), self.store.job_key(job_id), self.store.lease_key(job_id),
                *self._scope_keys(scopes)]
        args: list[Any] = [job_id, execution, int(job_lease_s * 1000), call_id, int(call_lease_s * 1000), tokens,
                           key, weight, proc_id, "rewait" if rewait else "claim", self.wake_channel, len(scopes),
                           self.proc_key("")]
        for s in scopes:
            args += [s.limits.concurrency or 0, s.limits.rpm or 0, s.limits.tpm or 0]
        reply = self._acquire(keys=keys, args=args)
        outcome = _text(reply[0])
        if outcome == "run":
            if rewait:
                return Attempt("run")
            spec: dict[str, Any] = json.loads(reply[3])
            spec["deadline"] = float(reply[4])
            spec["mode"] = _text(reply[5])
            return Attempt("run", Claim("run", int(reply[1]), float(reply[2]), spec))
        if outcome == "wait":
            return Attempt("wait", rank=int(reply[1]), wait_ms=int(reply[2]))
        if outcome in ("gone", "too_large"):
            return Attempt(outcome, detail=_text(reply[1]))
        return Attempt(outcome)

    def release(self, *, provider: str, scopes: list[Scope], call_id: str, actual_tokens: int | None,
                refund: bool = False) -> None:
        """Give back the concurrency permit and settle the TPM reservation to ``actual_tokens``
        (``refund``: the upstream did no work, e.g. it answered 429). Wakes the head of the line."""
        self._release(keys=[self.key(provider, "line"), *self._scope_keys(scopes)],
                      args=[call_id, -1 if actual_tokens is None else actual_tokens, 1 if refund else 0,
                            self.wake_channel, len(scopes)])

    def renew(self, scopes: list[Scope], call_id: str, lease_s: float) -> None:
        conc = [self.key(s.name, "conc") for s in scopes]
        if conc:
            self._renew(keys=conc, args=[call_id, int(lease_s * 1000)])

    def cool_down(self, provider: str, seconds: float) -> None:
        """Every worker of ``provider`` holds back for ``seconds`` (never shortens a longer cooldown)."""
        key = self.key(provider, "cooldown")
        ms = max(1, int(seconds * 1000))
        if self.redis.pttl(key) < ms:
            self.redis.set(key, 1, px=ms)

    def snapshot(self, provider: str, scopes: list[Scope]) -> dict[str, Any]:
        """Current use, for ``GET /v1/limits``."""
        now_ms = _now_ms(self.redis)
        pipe = self.redis.pipeline()
        for s in scopes:
            pipe.zcount(self.key(s.name, "conc"), now_ms, "+inf")
            pipe.zcount(self.key(s.name, "rpm"), now_ms - WINDOW_MS, "+inf")
            pipe.hget(self.key(s.name, "tok"), "sum")
        pipe.zcard(self.key(provider, "line"))
        pipe.pttl(self.key(provider, "cooldown"))
        values = pipe.execute()
        scopes_out = {}
        for i, s in enumerate(scopes):
            conc, rpm, tok = values[3 * i: 3 * i + 3]
            scopes_out[s.name] = {"limits": s.limits.model_dump(), "in_flight": conc, "requests_last_60s": rpm,
                                  "tokens_last_60s": int(tok or 0)}
        return {"scopes": scopes_out, "waiting_in_line": values[-2], "cooldown_ms": max(0, values[-1])}

    def line_length(self, provider: str) -> int:
        return int(self.redis.zcard(self.key(provider, "line")))

    def position(self, provider: str, job_id: str) -> int | None:
        rank = self.redis.zrank(self.key(provider, "line"), job_id)
        return None if rank is None else int(rank)


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
