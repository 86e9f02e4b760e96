"""Provider limits held across every worker process and machine, and the line jobs wait in.

Each limited provider has a *line*: a sorted set of the jobs its workers hold but have not started.
Only the head of the line may start, and only when every permit it needs is free — all taken in one
Lua script, timed by Redis ``TIME``, so any number of workers on any number of machines agree.

Per scope (the provider; the model if it sets its own limits; ``key:<id>``, an API key's own quota
over all providers, if ``key_limits`` gives it one)::

    P:lim:<scope>:conc   zset  call id -> lease expiry (ms)  calls in flight; a dead worker's lease lapses
    P:lim:<scope>:rpm    zset  call id -> start (ms)         calls started in the last 60 s
    P:lim:<scope>:tpm    zset  call id -> start (ms)         token reservations of the last 60 s ...
    P:lim:<scope>:tok    hash  call id -> tokens, 'sum'      ... and their amounts
    P:lim:<scope>:day    hash  'd' (UTC day number), 'r', 't'  requests and tokens today (rpd/tpd only)

Per provider::

    P:lim:<provider>:line      zset  job id -> fair-queue finish tag
    P:lim:<provider>:vt        hash  'V' (tag of the last started job), 'k:<key>' (a key's last tag)
    P:lim:<provider>:owner     hash  job id -> worker process id (whose heartbeat proves it still waits)
    P:lim:<provider>:keyof     hash  job id -> API key (only when some key has limits of its own)
    P:lim:<provider>:cooldown  key   set after an upstream 429; nobody starts until it expires
    P:lim:<provider>:next      key   when the head may next start (ms), while it waits for a window/day
    P:lim:keyblock             hash  API key -> until (ms): the key is at its own quota
    P:lim:proc:<id>            key   a worker process's heartbeat
    P:lim:wake                 pubsub  the job id that just became head of its line (or was withdrawn)

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
* An API key at its own quota (``key_limits``) is *blocked* until its quota has room (the exact
  window/day time, or the release of one of its calls): its jobs keep their places but the turn
  passes over them to the first job of another key, so a key at its quota never holds up the others.
  Per-day limits (``rpd``/``tpd``) count per UTC calendar day.
* Whoever changes the head of a line publishes the new head's id (admission, a head leaving, stale
  heads dropped), so only the head needs a timer: the jobs behind it sleep until woken, and re-check
  only rarely, as a safety net for a wake lost while their worker's subscription reconnected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from common.jobs import Claim, JobStore
from common.registry import Limits

WINDOW_MS = 60_000

# Lua shared by the scripts below. A *key block* (``P:lim:keyblock``: API key -> until, ms) marks an
# API key whose own limits are full: its jobs keep their places in every line, but the turn passes
# over them to the first job of another key, so one key at its quota never holds up the others.
# With no key limits configured (``keyed`` false) nothing is blocked and the head is the first job.
_LINE_LIB = """
local SCAN = 200   -- at most this many blocked jobs are passed over in one look at a line
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function block_of(keyof, blocks, member, now)
  local k = redis.call('HGET', keyof, member)
  if not k then return 0 end
  local u = tonumber(redis.call('HGET', blocks, k) or '0')
  if u > now then return u end
  return 0
end
local function first_unblocked(line, keyof, blocks, keyed, now)
  if not keyed then return redis.call('ZRANGE', line, 0, 0)[1] end
  for _, m in ipairs(redis.call('ZRANGE', line, 0, SCAN - 1)) do
    if block_of(keyof, blocks, m, now) == 0 then return m end
  end
  return nil
end
local function wake(line, keyof, blocks, keyed, now, channel)
  local head = first_unblocked(line, keyof, blocks, keyed, now)
  if head then redis.call('PUBLISH', channel, head) end
end
local function day_index(now) return math.floor(now / 86400000) end
"""

# KEYS: line, vt, owner, cooldown, job, job_lease, keyof, keyblock, next, [conc, rpm, tpm, tok, day] * n
# ARGV: job_id, execution, job_lease_ms, call_id, call_lease_ms, tokens, key, weight, proc_id, mode,
#       wake_channel, n, proc_key_prefix, keyed (1/0),
#       [conc_limit, rpm_limit, tpm_limit, rpd_limit, tpd_limit, is_key_scope] * n   (limit 0 = unlimited)
# -> {'run', attempt, queue_wait_s, spec, deadline, mode} | {'wait', rank, wait_ms} | {'expired'}
#    | {'gone', state} | {'too_large', limit description, scope index}
_ACQUIRE = _LINE_LIB + """
local now = now_ms()
local job_id, mode = ARGV[1], ARGV[10]
local n = tonumber(ARGV[12])
local keyed = ARGV[14] == '1'
local LINE, OWNER, KEYOF, BLOCKS = KEYS[1], KEYS[3], KEYS[7], KEYS[8]

local job_prefix = string.sub(KEYS[5], 1, #KEYS[5] - #job_id)
local function proc_alive(proc)
  return proc and redis.call('EXISTS', ARGV[13] .. proc) == 1
end
local function is_waiting(member)
  -- a job may start only if it is still waiting: queued (or re-waiting) and its worker alive
  local state = redis.call('HGET', job_prefix .. member, 'state')
  if state ~= 'queued' and state ~= 'running' then return false end
  return proc_alive(redis.call('HGET', OWNER, member))
end
local function drop(member)
  redis.call('ZREM', LINE, member)
  redis.call('HDEL', OWNER, member)
  redis.call('HDEL', KEYOF, member)
end
local function wake_head() wake(LINE, KEYOF, BLOCKS, keyed, now, ARGV[11]) end
local function leave_line()
  -- a job that leaves from the head hands the turn on: nobody else polls for it
  local was_head = first_unblocked(LINE, KEYOF, BLOCKS, keyed, now) == job_id
  drop(job_id)
  if was_head then wake_head() end
end

local state = redis.call('HGET', KEYS[5], 'state')
if mode == 'claim' then
  if state == 'running' then
    if redis.call('EXISTS', KEYS[6]) == 1 then return {'gone', 'busy'} end
  elseif state ~= 'queued' then
    leave_line()
    return {'gone', state or 'missing'}
  end
  if state == 'queued' and now > tonumber(redis.call('HGET', KEYS[5], 'deadline')) * 1000 then
    redis.call('HSET', KEYS[5], 'state', 'expired', 'finished_at', string.format('%.6f', now / 1000))
    leave_line()
    return {'expired'}
  end
end

-- join the line (once): fair-queue tag
local V = tonumber(redis.call('HGET', KEYS[2], 'V') or '0')
if not redis.call('ZSCORE', LINE, job_id) then
  local tag
  if mode == 'rewait' then
    tag = V - 1e-6                      -- back at the head: it already had its turn
  else
    local last = tonumber(redis.call('HGET', KEYS[2], 'k:' .. ARGV[7]) or '0')
    tag = math.max(V, last) + 1 / tonumber(ARGV[8])
    redis.call('HSET', KEYS[2], 'k:' .. ARGV[7], tag)
  end
  redis.call('ZADD', LINE, tag, job_id)
end
redis.call('HSET', OWNER, job_id, ARGV[9])
if keyed then redis.call('HSET', KEYOF, job_id, ARGV[7]) end

-- the head: the first job still waiting whose key is not blocked; drop the ones no longer waiting
-- (withdrawn, expired, or their worker died) on the way
local head, first_blocked
local dropped, i = false, 0
for _ = 1, SCAN do
  local m = redis.call('ZRANGE', LINE, i, i)[1]
  if m == nil then break end
  if m ~= job_id and not is_waiting(m) then
    drop(m)
    dropped = true
  elseif keyed and block_of(KEYOF, BLOCKS, m, now) > 0 then
    first_blocked = first_blocked or m
    i = i + 1
  else
    head = m
    break
  end
end
if head ~= job_id then
  -- the new head may not know it is one: waiters behind the head rely on being woken
  if dropped and head then redis.call('PUBLISH', ARGV[11], head) end
  local wait = 0
  -- the first job of a blocked key keeps a timer for when its key's block ends
  if first_blocked == job_id then wait = block_of(KEYOF, BLOCKS, job_id, now) - now end
  return {'wait', redis.call('ZRANK', LINE, job_id), wait}
end

local cooldown = redis.call('PTTL', KEYS[4])
if cooldown > 0 then return {'wait', 0, cooldown} end

local tokens = tonumber(ARGV[6])
local today = day_index(now)
local wait, key_wait = 0, 0
for i = 0, n - 1 do
  local conc, rpm, tpm, tok, day = KEYS[10 + 5 * i], KEYS[11 + 5 * i], KEYS[12 + 5 * i], KEYS[13 + 5 * i], KEYS[14 + 5 * i]
  local a = 15 + 6 * i
  local conc_limit, rpm_limit, tpm_limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local rpd_limit, tpd_limit, is_key = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5] == '1'
  local w = 0
  redis.call('ZREMRANGEBYSCORE', conc, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', rpm, '-inf', now - 60000)
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', tpm, '-inf', now - 60000)) do
    -- 0 - n, not -n: Lua formats -0 as '-0', which HINCRBY rejects (a refunded entry holds 0)
    redis.call('HINCRBY', tok, 'sum', 0 - tonumber(redis.call('HGET', tok, old) or '0'))
    redis.call('HDEL', tok, old)
  end
  redis.call('ZREMRANGEBYSCORE', tpm, '-inf', now - 60000)
  if conc_limit > 0 and redis.call('ZCARD', conc) >= conc_limit then
    w = math.max(w, 1000)   -- a release wakes the head sooner; this is the lapsed-lease fallback
  end
  if rpm_limit > 0 and redis.call('ZCARD', rpm) >= rpm_limit then
    local oldest = redis.call('ZRANGE', rpm, 0, 0, 'WITHSCORES')
    w = math.max(w, tonumber(oldest[2]) + 60000 - now + 1)
  end
  if tpm_limit > 0 then
    if tokens > tpm_limit then return {'too_large', tpm_limit .. ' tokens per minute', i} end
    local sum = tonumber(redis.call('HGET', tok, 'sum') or '0')
    if sum + tokens > tpm_limit then
      local freed = 0
      local entries = redis.call('ZRANGE', tpm, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + tonumber(redis.call('HGET', tok, entries[j]) or '0')
        if sum - freed + tokens <= tpm_limit then
          w = math.max(w, tonumber(entries[j + 1]) + 60000 - now + 1)
          break
        end
      end
    end
  end
  if rpd_limit > 0 or tpd_limit > 0 then
    if tpd_limit > 0 and tokens > tpd_limit then return {'too_large', tpd_limit .. ' tokens per day', i} end
    local d = redis.call('HMGET', day, 'd', 'r', 't')
    if tonumber(d[1] or '-1') == today then
      if (rpd_limit > 0 and tonumber(d[2]) + 1 > rpd_limit)
          or (tpd_limit > 0 and tonumber(d[3]) + tokens > tpd_limit) then
        w = math.max(w, (today + 1) * 86400000 - now + 1)   -- the next UTC day
      end
    end
  end
  if is_key then key_wait = math.max(key_wait, w) else wait = math.max(wait, w) end
end
if key_wait > 0 then
  -- this key is at its own quota: block it, and pass the turn to the next job of another key
  redis.call('HSET', BLOCKS, ARGV[7], now + key_wait)
  redis.call('PEXPIRE', BLOCKS, 2 * 86400000)   -- no block lasts longer than a day
  wake_head()
  return {'wait', 0, key_wait}
end
if wait > 0 then
  redis.call('SET', KEYS[9], now + wait, 'PX', wait)
  return {'wait', 0, wait}
end

-- admitted: take every permit, leave the line, advance the virtual clock
for i = 0, n - 1 do
  local conc, rpm, tpm, tok, day = KEYS[10 + 5 * i], KEYS[11 + 5 * i], KEYS[12 + 5 * i], KEYS[13 + 5 * i], KEYS[14 + 5 * i]
  redis.call('ZADD', conc, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('ZADD', rpm, now, ARGV[4])
  redis.call('ZADD', tpm, now, ARGV[4])
  redis.call('HSET', tok, ARGV[4], tokens)
  redis.call('HINCRBY', tok, 'sum', tokens)
  for _, k in ipairs({conc, rpm, tpm, tok}) do redis.call('PEXPIRE', k, 120000 + tonumber(ARGV[5])) end
  local a = 15 + 6 * i
  if tonumber(ARGV[a + 3]) > 0 or tonumber(ARGV[a + 4]) > 0 then
    if tonumber(redis.call('HGET', day, 'd') or '-1') ~= today then
      redis.call('HSET', day, 'd', today, 'r', 0, 't', 0)
    end
    redis.call('HINCRBY', day, 'r', 1)
    redis.call('HINCRBY', day, 't', tokens)
    redis.call('PEXPIRE', day, 2 * 86400000)
  end
end
local tag = tonumber(redis.call('ZSCORE', LINE, job_id))
if tag > V then redis.call('HSET', KEYS[2], 'V', tag) end
drop(job_id)
wake_head()

if mode == 'rewait' then return {'run', 0, '0', '', '0', ''} end
redis.call('HSET', KEYS[5], 'state', 'running', 'started_at', string.format('%.6f', now / 1000))
local attempt = redis.call('HINCRBY', KEYS[5], 'attempts', 1)
redis.call('SET', KEYS[6], ARGV[2], 'PX', ARGV[3])
local job = redis.call('HMGET', KEYS[5], 'created_at', 'spec', 'deadline', 'mode')
return {'run', attempt, string.format('%.6f', now / 1000 - tonumber(job[1])), job[2], job[3], job[4]}
"""

# KEYS: line, keyof, keyblock, [conc, rpm, tpm, tok, day] * n
# ARGV: call_id, actual_tokens (-1 = keep), refund (1/0), wake, n, keyed (1/0), key ('' = no key scope)
# The call's RPM/TPM entries are re-stamped with the release time: the upstream counted the call when
# it arrived there, after our admission, so a window that started at admission would free its slot
# before the upstream's does. Stamped at release, ours always frees later than the upstream's.
# The day counters are settled the same way as the TPM reservation (a refund also gives the request
# back). A key's block is lifted: the call that held its quota ended, so it may have room again.
_RELEASE = _LINE_LIB + """
local now = now_ms()
local n = tonumber(ARGV[5])
local today = day_index(now)
for i = 0, n - 1 do
  local conc, rpm, tpm, tok, day = KEYS[4 + 5 * i], KEYS[5 + 5 * i], KEYS[6 + 5 * i], KEYS[7 + 5 * i], KEYS[8 + 5 * i]
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
      if tonumber(redis.call('HGET', day, 'd') or '-1') == today then
        redis.call('HINCRBY', day, 't', actual - tonumber(reserved))
        if ARGV[3] == '1' then redis.call('HINCRBY', day, 'r', -1) end
      end
    end
  end
end
local keyed = ARGV[6] == '1'
if ARGV[7] ~= '' then redis.call('HDEL', KEYS[3], ARGV[7]) end
wake(KEYS[1], KEYS[2], KEYS[3], keyed, now, ARGV[4])
return 1
"""

# KEYS: line, owner, keyof, keyblock   ARGV: job_id, wake channel, keyed (1/0)
_LEAVE = _LINE_LIB + """
local now = now_ms()
local keyed = ARGV[3] == '1'
local was_head = first_unblocked(KEYS[1], KEYS[3], KEYS[4], keyed, now) == ARGV[1]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if was_head then wake(KEYS[1], KEYS[3], KEYS[4], keyed, now, ARGV[2]) end
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
    """One set of limits and the Redis keys that count against it: a provider's, a model's, or an API
    key's own quota (``key`` set: ``key:<id>``, shared by every provider's line)."""

    name: str
    limits: Limits
    key: str | None = None

    @classmethod
    def of_model(cls, provider: str, alias: str, limits: Limits) -> Scope:
        return cls(f"{provider}/{alias}", limits)

    @classmethod
    def of_key(cls, key_id: str, limits: Limits) -> Scope:
        return cls(f"key:{key_id}", limits, key=key_id)


@dataclass(frozen=True)
class Attempt:
    outcome: str                  # run | wait | expired | gone | too_large
    claim: Claim | None = None
    rank: int = 0                 # position in line when waiting (0 = head)
    wait_ms: int = 0              # when the head may try again (0 = when woken)
    detail: str = ""


class Limiter:
    """``keyed``: some API key has limits of its own (the registry's ``key_limits``); only then does the
    line look past jobs of blocked keys — with none, the head is simply the first job."""

    def __init__(self, store: JobStore, *, keyed: bool = False) -> None:
        self.store = store
        self.keyed = keyed
        self.redis: redis.Redis = store.redis
        self.prefix = store.prefix
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._leave = self.redis.register_script(_LEAVE)

    # keys ---------------------------------------------------------------------------------------
    def key(self, scope: str, kind: str) -> str:
        return f"{self.prefix}:lim:{scope}:{kind}"

    @property
    def wake_channel(self) -> str:
        return self.store.wake_channel

    def proc_key(self, proc_id: str) -> str:
        return f"{self.prefix}:lim:proc:{proc_id}"

    def _scope_keys(self, scopes: list[Scope]) -> list[str]:
        return [self.key(s.name, kind) for s in scopes for kind in ("conc", "rpm", "tpm", "tok", "day")]

    @property
    def _keyblock(self) -> str:
        return f"{self.prefix}:lim:keyblock"

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
                self.key(provider, "keyof"), self._keyblock, self.key(provider, "next"), *self._scope_keys(scopes)]
        args: list[Any] = [job_id, execution, int(job_lease_s * 1000), call_id, int(call_lease_s * 1000), tokens,
                           key, weight, proc_id, "rewait" if rewait else "claim", self.wake_channel, len(scopes),
                           self.proc_key(""), 1 if self.keyed else 0]
        for s in scopes:
            lim = s.limits
            args += [lim.concurrency or 0, lim.rpm or 0, lim.tpm or 0, lim.rpd or 0, lim.tpd or 0,
                     1 if s.key is not None else 0]
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
        if outcome == "too_large":
            scope = scopes[int(reply[2])]
            whose = "your API key's quota" if scope.key is not None else f"'{scope.name}'"
            return Attempt(outcome, detail=f"the {_text(reply[1])} {whose} allows")
        if outcome == "gone":
            return Attempt(outcome, detail=_text(reply[1]))
        return Attempt(outcome)

    def release(self, *, provider: str, scopes: list[Scope], call_id: str, actual_tokens: int | None,
                refund: bool = False) -> None:
        """Give back the concurrency permit and settle the TPM reservation to ``actual_tokens``
        (``refund``: the upstream did no work, e.g. it answered 429). Lifts the block of the call's API
        key, if it has limits of its own, and wakes the head of the line."""
        key = next((s.key for s in scopes if s.key is not None), "")
        self._release(keys=[self.key(provider, "line"), self.key(provider, "keyof"), self._keyblock,
                            *self._scope_keys(scopes)],
                      args=[call_id, -1 if actual_tokens is None else actual_tokens, 1 if refund else 0,
                            self.wake_channel, len(scopes), 1 if self.keyed else 0, key])

    def leave(self, provider: str, job_id: str) -> None:
        """Take a waiting job out of its line (it gave up); if it was the head, wake the next."""
        self._leave(keys=[self.key(provider, "line"), self.key(provider, "owner"), self.key(provider, "keyof"),
                          self._keyblock], args=[job_id, self.wake_channel, 1 if self.keyed else 0])

    def blocked_for(self, provider: str, key: str | None) -> float:
        """Seconds before this provider's line may start anything (its head was told when a window
        or a day frees), or — longer — before ``key``'s own quota has room: the floor of an honest
        Retry-After."""
        now_ms = _now_ms(self.redis)
        next_try, key_until = self.redis.get(self.key(provider, "next")), (
            self.redis.hget(self._keyblock, key) if key and self.keyed else None)
        until = max(float(next_try or 0), float(key_until or 0))
        return max(0.0, (until - now_ms) / 1000)

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
        scopes_out = self.use(scopes, now_ms, pipe)
        pipe.zcard(self.key(provider, "line"))
        pipe.pttl(self.key(provider, "cooldown"))
        values = pipe.execute()
        return {"scopes": scopes_out(values), "waiting_in_line": values[-2], "cooldown_ms": max(0, values[-1])}

    def use(self, scopes: list[Scope], now_ms: int, pipe: Any) -> Any:
        """Queue on ``pipe`` the reads of each scope's current use; returns the function that turns the
        pipeline's values into ``{scope: {limits, in_flight, requests_last_60s, ...}}``."""
        for s in scopes:
            pipe.zcount(self.key(s.name, "conc"), now_ms, "+inf")
            pipe.zcount(self.key(s.name, "rpm"), now_ms - WINDOW_MS, "+inf")
            pipe.hget(self.key(s.name, "tok"), "sum")
            pipe.hmget(self.key(s.name, "day"), "d", "r", "t")

        def render(values: list[Any]) -> dict[str, Any]:
            out = {}
            for i, s in enumerate(scopes):
                conc, rpm, tok, (day, requests, tokens) = values[4 * i: 4 * i + 4]
                entry = {"limits": s.limits.model_dump(exclude_none=True), "in_flight": conc,
                         "requests_last_60s": rpm, "tokens_last_60s": int(tok or 0)}
                if s.limits.rpd or s.limits.tpd:
                    today = day is not None and int(day) == now_ms // 86_400_000
                    entry["requests_today"] = int(requests) if today else 0
                    entry["tokens_today"] = int(tokens) if today else 0
                out[s.name] = entry
            return out
        return render

    def key_use(self, key_id: str, limits: Limits) -> dict[str, Any]:
        """An API key's own quota and its use (``GET /v1/limits``, for the calling key)."""
        scope = Scope.of_key(key_id, limits)
        now_ms = _now_ms(self.redis)
        pipe = self.redis.pipeline()
        render = self.use([scope], now_ms, pipe)
        pipe.hget(self._keyblock, key_id)
        values = pipe.execute()
        entry: dict[str, Any] = render(values)[scope.name]
        blocked = max(0, int(float(values[-1] or 0)) - now_ms)
        entry["blocked_ms"] = blocked
        return entry

    def window_start_in(self, scope: str, rpm: int, ahead: int) -> float | None:
        """Seconds until the call behind ``ahead`` others may start, if ``scope``'s RPM window is what
        holds them back; None while the window still has room for all of them (then something else —
        concurrency, TPM — paces the line).

        Every call ahead takes the next slot to free: the ones free now first, then slot ``j`` (0-based)
        frees 60 s after the start of the ``j``-th call in the current window (or, past those, 60 s
        after now, when the slots used now free again), ``j // rpm`` whole windows later — the line
        moves in one burst per window, which a rate over the last minute cannot describe."""
        now_ms = _now_ms(self.redis)
        rpm_key = self.key(scope, "rpm")
        in_window = int(self.redis.zcount(rpm_key, now_ms - WINDOW_MS, "+inf"))
        slot = ahead - (rpm - in_window)
        if slot < 0:
            return None
        cycles, index = divmod(slot, rpm)
        base = float(now_ms)
        if index < in_window:
            starts = self.redis.zrangebyscore(rpm_key, now_ms - WINDOW_MS, "+inf", start=index, num=1,
                                              withscores=True)
            if starts:
                base = starts[0][1]
        frees_at = base + WINDOW_MS * (cycles + 1)
        return max(0.0, (frees_at - now_ms) / 1000)

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
