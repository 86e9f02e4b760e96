-- The permits a call takes in each scope it counts against (common/limits.py LIMIT_KINDS). Every
-- limit kind is one entry of KINDS with its number of per-scope keys and three steps:
--   check(k, limit, c)  -> 0 if there is room; else ms until there may be, or false if the call alone
--                          exceeds the limit (it could never start). limit 0 = counted, not checked.
--   take(k, c)          count the call (all or none: take runs only after every check passed)
--   settle(k, c)        the call ended: give back / correct what take counted
-- k: the kind's keys; c: {now, call, tokens, lease_ms, window_ms, day_ms, actual (-1 = keep), refund}.
-- Adding a kind (a USD budget) is one entry here and one row in LIMIT_KINDS.

local KINDS = {}

local function day_of(c) return math.floor(c.now / c.day_ms) end
local function to_next_day(c) return (day_of(c) + 1) * c.day_ms - c.now + 1 end
local function keep(key, c) redis.call('PEXPIRE', key, 2 * c.window_ms + c.lease_ms) end

-- a day counter: hash {d = UTC day number, n = count}; a new day starts from 0
local function day_count(key, c)
  local d = redis.call('HMGET', key, 'd', 'n')
  if tonumber(d[1] or '-1') ~= day_of(c) then return 0 end
  return tonumber(d[2])
end
local function day_add(key, c, amount)
  if tonumber(redis.call('HGET', key, 'd') or '-1') ~= day_of(c) then
    redis.call('HSET', key, 'd', day_of(c), 'n', 0)
  end
  redis.call('HINCRBY', key, 'n', amount)
  redis.call('PEXPIRE', key, 2 * c.day_ms)
end
local function day_correct(key, c, amount)
  if amount ~= 0 and tonumber(redis.call('HGET', key, 'd') or '-1') == day_of(c) then
    redis.call('HINCRBY', key, 'n', amount)
  end
end

-- concurrency: zset call -> lease expiry (a dead worker's call lapses)
KINDS.concurrency = {keys = 1,
  check = function(k, limit, c)
    redis.call('ZREMRANGEBYSCORE', k[1], '-inf', c.now)
    if limit > 0 and redis.call('ZCARD', k[1]) >= limit then
      return 1000   -- a release wakes the head sooner; this is the lapsed-lease fallback
    end
    return 0
  end,
  take = function(k, c)
    redis.call('ZADD', k[1], c.now + c.lease_ms, c.call)
    keep(k[1], c)
  end,
  settle = function(k, c) redis.call('ZREM', k[1], c.call) end}

-- rpm: zset call -> start, over a sliding window. Re-stamped at release: the upstream counted the
-- call when it arrived there, after our admission, so ours must free its slot later than the upstream's.
KINDS.rpm = {keys = 1,
  check = function(k, limit, c)
    redis.call('ZREMRANGEBYSCORE', k[1], '-inf', c.now - c.window_ms)
    if limit > 0 and redis.call('ZCARD', k[1]) >= limit then
      local oldest = redis.call('ZRANGE', k[1], 0, 0, 'WITHSCORES')
      return tonumber(oldest[2]) + c.window_ms - c.now + 1
    end
    return 0
  end,
  take = function(k, c)
    redis.call('ZADD', k[1], c.now, c.call)
    keep(k[1], c)
  end,
  settle = function(k, c) redis.call('ZADD', k[1], 'XX', c.now, c.call) end}

-- tpm: zset call -> start, and hash call -> tokens reserved plus their 'sum', over a sliding window;
-- a reservation is settled to the real count at release (0 for a refund)
KINDS.tpm = {keys = 2,
  check = function(k, limit, c)
    local tpm, tok = k[1], k[2]
    for _, old in ipairs(redis.call('ZRANGEBYSCORE', tpm, '-inf', c.now - c.window_ms)) do
      -- 0 - n, not -n: Lua formats -0 as '-0', which HINCRBY rejects (a refunded entry holds 0)
      redis.call('HINCRBY', tok, 'sum', 0 - tonumber(redis.call('HGET', tok, old) or '0'))
      redis.call('HDEL', tok, old)
    end
    redis.call('ZREMRANGEBYSCORE', tpm, '-inf', c.now - c.window_ms)
    if limit == 0 then return 0 end
    if c.tokens > limit then return false end
    local sum = tonumber(redis.call('HGET', tok, 'sum') or '0')
    if sum + c.tokens <= limit then return 0 end
    local freed = 0
    local entries = redis.call('ZRANGE', tpm, 0, -1, 'WITHSCORES')
    for j = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', tok, entries[j]) or '0')
      if sum - freed + c.tokens <= limit then return tonumber(entries[j + 1]) + c.window_ms - c.now + 1 end
    end
    return 0
  end,
  take = function(k, c)
    redis.call('ZADD', k[1], c.now, c.call)
    redis.call('HSET', k[2], c.call, c.tokens)
    redis.call('HINCRBY', k[2], 'sum', c.tokens)
    keep(k[1], c)
    keep(k[2], c)
  end,
  settle = function(k, c)
    redis.call('ZADD', k[1], 'XX', c.now, c.call)
    local reserved = redis.call('HGET', k[2], c.call)
    if reserved and c.actual >= 0 then   -- gone: the window already forgot the reservation
      redis.call('HINCRBY', k[2], 'sum', c.actual - tonumber(reserved))
      redis.call('HSET', k[2], c.call, c.actual)
    end
  end}

-- rpd: requests per UTC day; a refunded call gives its request back
KINDS.rpd = {keys = 1,
  check = function(k, limit, c)
    if limit > 0 and day_count(k[1], c) + 1 > limit then return to_next_day(c) end
    return 0
  end,
  take = function(k, c) day_add(k[1], c, 1) end,
  settle = function(k, c) if c.refund then day_correct(k[1], c, -1) end end}

-- tpd: tokens per UTC day, reserved at admission and settled to the real count
KINDS.tpd = {keys = 1,
  check = function(k, limit, c)
    if limit == 0 then return 0 end
    if c.tokens > limit then return false end
    if day_count(k[1], c) + c.tokens > limit then return to_next_day(c) end
    return 0
  end,
  take = function(k, c) day_add(k[1], c, c.tokens) end,
  settle = function(k, c) if c.actual >= 0 then day_correct(k[1], c, c.actual - c.tokens) end end}

-- The scopes of one call from the script's arguments: scopes = [{key = bool, kinds = [[name, limit]]}]
-- in the order of LIMIT_KINDS, their keys in KEYS from `first` on, each kind taking KINDS[name].keys.
local function permits_open(scopes, first)
  local at = first
  for _, s in ipairs(scopes) do
    for _, step in ipairs(s.kinds) do
      local kind = KINDS[step[1]]
      local k = {}
      for j = 1, kind.keys do k[j] = KEYS[at]; at = at + 1 end
      step.kind, step.keys = kind, k
    end
  end
  return scopes
end

-- -> wait, key_wait (ms; 0 = room) or false, kind name, limit, scope index (0-based) if too large.
-- A key scope's wait is kept apart: it blocks the key, not the line.
local function permits_check(scopes, c)
  local wait, key_wait = 0, 0
  for i, s in ipairs(scopes) do
    local w = 0
    for _, step in ipairs(s.kinds) do
      local kw = step.kind.check(step.keys, step[2], c)
      if kw == false then return false, step[1], step[2], i - 1 end
      w = math.max(w, kw)
    end
    if s.key then key_wait = math.max(key_wait, w) else wait = math.max(wait, w) end
  end
  return wait, key_wait
end

local function permits_apply(scopes, c, verb)
  for _, s in ipairs(scopes) do
    for _, step in ipairs(s.kinds) do step.kind[verb](step.keys, c) end
  end
end
