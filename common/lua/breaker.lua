-- A deployment's circuit breaker and its measured latency / error rate (common/routing/breaker.py),
-- shared by every worker and API process.
-- KEYS: state hash, failures zset
-- ARGV: op ('admit' | 'report'), failures, window_ms, open_ms, misconfigured_open_ms, probes, probe_ttl_ms,
--       [report: outcome ('ok' | 'fail' | 'misconfigured' | 'neutral'), was_probe (1/0), latency_ms,
--        tau_ms (how fast the averages forget)]
--
--   closed --`failures` fails within window_ms--> open (until now + open_ms)
--   open --time passes--> half-open: up to `probes` calls at once (each a probe, lease probe_ttl_ms)
--   half-open --a probe succeeds--> closed          --a probe fails--> open again
--   any --401/403 (misconfigured)--> open for misconfigured_open_ms
-- admit -> {'call' | 'probe' | 'open', ms until it may be worth asking again}
-- report -> {the state after it ('closed' | 'open'), 0}: a worker remembers 'closed' for a moment
--           (workers/failover.py) instead of asking admit before each call
local now
do local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local h, f = KEYS[1], KEYS[2]
local threshold, window, open_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_probes, probe_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local state = redis.call('HGET', h, 'state') or 'closed'

local function open_for(ms, reason)
  redis.call('HSET', h, 'state', 'open', 'until', now + ms, 'probes', 0, 'reason', reason,
             'opened_at', now)
  redis.call('HINCRBY', h, 'opened', 1)
  redis.call('DEL', f)
  state = 'open'
end

-- probes in flight; a probe whose worker died stops counting when its lease passes
local function probes_in_flight()
  local n = tonumber(redis.call('HGET', h, 'probes') or '0')
  if n > 0 and now > tonumber(redis.call('HGET', h, 'probe_until') or '0') then n = 0 end
  return n
end

if ARGV[1] == 'admit' then
  if state == 'closed' then return {'call', 0} end
  local reopen = tonumber(redis.call('HGET', h, 'until') or '0')
  if now < reopen then return {'open', reopen - now} end
  local n = probes_in_flight()
  if n >= max_probes then return {'open', 250} end
  redis.call('HSET', h, 'probes', n + 1, 'probe_until', now + probe_ttl)
  return {'probe', 0}
end

-- report
local outcome, was_probe, latency, tau = ARGV[8], ARGV[9] == '1', tonumber(ARGV[10]), tonumber(ARGV[11])
if was_probe then redis.call('HSET', h, 'probes', math.max(0, probes_in_flight() - 1)) end
-- decaying averages: the older the last sample, the less it weighs (alpha grows with the gap)
local function average(field, value)
  local at = tonumber(redis.call('HGET', h, field .. '_at') or '0')
  local old = redis.call('HGET', h, field)
  local alpha = 1 - 0.8 * math.exp(-(now - at) / tau)
  local new = value
  if old then new = tonumber(old) + alpha * (value - tonumber(old)) end
  redis.call('HSET', h, field, string.format('%.4f', new), field .. '_at', now)
end
if outcome ~= 'neutral' then
  average('err', (outcome == 'ok') and 0 or 1)
  redis.call('HINCRBY', h, 'calls', 1)
end
if outcome == 'ok' then
  average('lat', latency)
  if state == 'open' and was_probe then
    redis.call('HSET', h, 'state', 'closed', 'probes', 0, 'reason', '')
    redis.call('DEL', f)
    state = 'closed'
  end
elseif outcome == 'misconfigured' then
  open_for(tonumber(ARGV[5]), 'misconfigured')
elseif outcome == 'fail' then
  if state == 'open' then
    -- a probe failed: open again; a call that started before the breaker opened changes nothing
    if was_probe then open_for(open_ms, 'failures') end
  else
    redis.call('ZADD', f, now, now .. ':' .. redis.call('HINCRBY', h, 'seq', 1))
    redis.call('ZREMRANGEBYSCORE', f, '-inf', now - window)
    redis.call('PEXPIRE', f, window)
    if redis.call('ZCARD', f) >= threshold then open_for(open_ms, 'failures') end
  end
end
return {state, 0}
