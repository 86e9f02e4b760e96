-- KEYS: job, abort   ARGV: new_state (expired | cancelled), job_id, wake channel, abort_ttl_s
-- -> the job's state afterwards (or 'missing')
-- The API gives up on a sync job whose caller it answered without the job's result (504, 503, 429,
-- a disconnect): a queued job is withdrawn (as withdraw.lua); a running one is marked 'abandoned'
-- (its claim will never start it again: job_check settles it cancelled if its worker dies) and its
-- worker is asked to stop relaying (the abort key) — in the same atomic step.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', stamp(now_ms()), 'abandoned', 1)
  budget_settle(KEYS[1], '0', '0')
  redis.call('PUBLISH', ARGV[3], ARGV[2])
  return ARGV[1]
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'abandoned', 1)
  redis.call('SET', KEYS[2], 1, 'EX', ARGV[4])
end
return state
