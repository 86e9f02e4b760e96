-- KEYS: budget hash   ARGV: spent, tspent, limit, tlimit, thresholds, alerts stream, ttl_s (0: none),
--   n, then per job that held a reservation when the rebuild looked: job key, units, tokens, lapse_at_ms,
--   units and tokens of that job the rebuild already counted (its usage row, if it had one by then)
-- -> 1 if seeded, 0 if the hash exists (another process rebuilt it first: theirs stands)
-- Rebuilds a budget's hash from what Postgres (and the usage stream) says was spent
-- (common/budgetstate.py). A job that settled between the rebuild's look and this step found no hash
-- to charge: its charge ('bcharged') is added here, less what the rebuild counted of it already.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'spent', ARGV[1], 'reserved', 0, 'tspent', ARGV[2], 'treserved', 0,
           'limit', ARGV[3], 'tlimit', ARGV[4], 'th', ARGV[5], 'alerts', ARGV[6])
local n = tonumber(ARGV[8])
for i = 0, n - 1 do
  local job, units, tokens, lapse = ARGV[9 + i * 6], ARGV[10 + i * 6], ARGV[11 + i * 6], ARGV[12 + i * 6]
  local counted_u, counted_t = ARGV[13 + i * 6], ARGV[14 + i * 6]
  local charged = redis.call('HGET', job, 'bcharged')
  if charged then
    local u, t = string.match(charged, '(%d+) (%d+)')
    redis.call('HINCRBY', KEYS[1], 'spent', u)
    redis.call('HINCRBY', KEYS[1], 'spent', neg(counted_u))
    redis.call('HINCRBY', KEYS[1], 'tspent', t)
    redis.call('HINCRBY', KEYS[1], 'tspent', neg(counted_t))
  elseif redis.call('EXISTS', job) == 1 then
    budget_reserve(KEYS[1], job, units, tokens, lapse)
  end
end
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  if redis.call('EXISTS', KEYS[1] .. ':exp') == 1 then redis.call('EXPIRE', KEYS[1] .. ':exp', ARGV[7]) end
end
budget_alert(KEYS[1])
return 1
