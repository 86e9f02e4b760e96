-- Budgets (common/budgetstate.py). One hash per budget and period, P:budget:<id>:<period start>:
--   spent, reserved        integer units of 1e-10 USD (the usage table's scale: sums are exact)
--   tspent, treserved      tokens
--   limit, tlimit          the budget's limits (-1: none); the admin service rewrites them on a change,
--                          so a lowered budget blocks new calls at once
--   th                     alert thresholds, percent, comma-separated; a:<pct> = fired this period
--   alerts                 the stream alerts go to (workers/budget_alerts.py delivers them)
--   j:<job key>            a live job's reservation, "units tokens"
-- and a sorted set P:budget:<id>:<period start>:exp of job key -> when its reservation lapses (ms), so a
-- reservation whose job vanished (its Redis state lost) is refunded instead of held for ever.
-- The job hash names its budget hashes ('budgets') and its reservation ('bres'); 'bcharged' marks the
-- one settlement a job ever gets (what it was charged), whoever ends it.

-- HINCRBY takes integers as text: amounts stay strings (a Lua number may print as 1e+15)
local function neg(s) if s == '0' then return '0' end return '-' .. s end

local function budget_release(key, job)
  local held = redis.call('HGET', key, 'j:' .. job)
  if held then
    local u, t = string.match(held, '(%d+) (%d+)')
    redis.call('HINCRBY', key, 'reserved', neg(u))
    redis.call('HINCRBY', key, 'treserved', neg(t))
    redis.call('HDEL', key, 'j:' .. job)
  end
  redis.call('ZREM', key .. ':exp', job)
end

local function budget_refund_lapsed(key, now)
  local lapsed = redis.call('ZRANGEBYSCORE', key .. ':exp', '-inf', now, 'LIMIT', 0, 20)
  for _, job in ipairs(lapsed) do budget_release(key, job) end
end

-- Whether `units`/`tokens` more fit in budget hash `key`: nil if they do, 'cold' if the hash is
-- missing (the caller rebuilds it from Postgres and tries again), else 'over' and the hash's numbers.
local function budget_check(key, units, tokens, now)
  units, tokens = tonumber(units), tonumber(tokens)
  if redis.call('EXISTS', key) == 0 then return 'cold' end
  budget_refund_lapsed(key, now)
  local b = redis.call('HMGET', key, 'spent', 'reserved', 'limit', 'tspent', 'treserved', 'tlimit')
  local spent, reserved, limit = tonumber(b[1] or 0), tonumber(b[2] or 0), tonumber(b[3] or -1)
  local tspent, treserved, tlimit = tonumber(b[4] or 0), tonumber(b[5] or 0), tonumber(b[6] or -1)
  if (limit >= 0 and spent + reserved + units > limit) or (tlimit >= 0 and tspent + treserved + tokens > tlimit) then
    return 'over', {b[1] or '0', b[2] or '0', b[3] or '-1', b[4] or '0', b[5] or '0', b[6] or '-1'}
  end
  return nil
end

local function budget_reserve(key, job, units, tokens, lapse_at)
  redis.call('HINCRBY', key, 'reserved', units)
  redis.call('HINCRBY', key, 'treserved', tokens)
  redis.call('HSET', key, 'j:' .. job, units .. ' ' .. tokens)
  redis.call('ZADD', key .. ':exp', lapse_at, job)
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then redis.call('PEXPIRE', key .. ':exp', ttl) end
end

-- Soft thresholds: each fires once per budget and period (a:<pct>), onto the alerts stream.
local function budget_alert(key)
  local b = redis.call('HMGET', key, 'spent', 'limit', 'tspent', 'tlimit', 'th', 'alerts')
  if not b[5] or b[5] == '' or not b[6] or b[6] == '' then return end
  local spent, limit, tspent, tlimit = tonumber(b[1] or 0), tonumber(b[2] or -1), tonumber(b[3] or 0),
                                       tonumber(b[4] or -1)
  for pct in string.gmatch(b[5], '%d+') do
    local p = tonumber(pct)
    if (limit > 0 and spent * 100 >= limit * p) or (tlimit > 0 and tspent * 100 >= tlimit * p) then
      if redis.call('HSETNX', key, 'a:' .. pct, 1) == 1 then
        redis.call('XADD', b[6], 'MAXLEN', '~', 100000, '*', 'budget', key, 'pct', pct, 'spent', b[1] or '0',
                   'limit', b[2] or '-1', 'tspent', b[3] or '0', 'tlimit', b[4] or '-1')
      end
    end
  end
end

-- The job's one settlement: release its reservations and charge what it really cost (0 for a call that
-- never ran or failed). A second call (a redelivery, a withdraw racing a settle) changes nothing. A
-- budget hash that is gone (lost, or rebuilding) is not recreated here: the job's charge is on the job
-- ('bcharged') and its usage row, which is what the rebuild counts (common/budgetstate.py).
local function budget_settle(job, units, tokens)
  local keys = redis.call('HGET', job, 'budgets')
  if not keys or keys == '' then return end
  if redis.call('HSETNX', job, 'bcharged', units .. ' ' .. tokens) == 0 then return end
  for key in string.gmatch(keys, '%S+') do
    budget_release(key, job)
    if (units ~= '0' or tokens ~= '0') and redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'spent', units)
      redis.call('HINCRBY', key, 'tspent', tokens)
      budget_alert(key)
    end
  end
end
