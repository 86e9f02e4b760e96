-- KEYS: events, job, lease, stats, usage
-- ARGV: job_id, event (JSON), ttl_ms, final_state ('' = not final), execution, usage row ('' = none),
--       async row outcome ('' = none: Postgres has it already), the job's budget charge: units
--       (1e-10 USD) and tokens ('0' for a call that cost nothing)
-- -> 1, or 0 if the event was final and the job had settled already (nothing emitted)
-- A final event settles the job (job_settle) and may carry the call's usage row: it joins the usage
-- stream in the same atomic step, and the ledger moves it to Postgres in batches (workers/usage.py).
-- It also counts one completion in the provider's ring of 12 ten-second buckets: the API divides the
-- queue ahead by that rate to give an honest Retry-After.
if ARGV[4] ~= '' then
  local now = now_ms()
  if not job_settle(KEYS[2], KEYS[3], ARGV[4], ARGV[5], now) then return 0 end
  -- the job's budgets: its reservation released and its real cost charged, exactly once (budget.lua)
  budget_settle(KEYS[2], ARGV[8] or '0', ARGV[9] or '0')
  local bucket = math.floor(now / 10000)
  local slot = bucket % 12
  if redis.call('HGET', KEYS[4], 't' .. slot) ~= tostring(bucket) then
    redis.call('HSET', KEYS[4], 't' .. slot, bucket, 'c' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[4], 'c' .. slot, 1)
  redis.call('EXPIRE', KEYS[4], 600)
  if ARGV[6] ~= '' then redis.call('XADD', KEYS[5], '*', 'u', ARGV[6]) end
end
-- An async job settled while Postgres was unreachable: its row's outcome (with its usage row) waits on
-- the same stream until a worker's flusher commits it (common/outbox.py). 'outbox' on the job marks
-- it, so the reconciler leaves the row to the flusher. (A job that expired in line has its state set
-- already: ARGV[4] is '' then, and its outcome still goes.)
if ARGV[7] and ARGV[7] ~= '' then
  redis.call('XADD', KEYS[5], '*', 'j', ARGV[7])
  redis.call('HSET', KEYS[2], 'outbox', 1)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 10000, '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local reply_to = redis.call('HGET', KEYS[2], 'reply_to')
if reply_to and reply_to ~= '' then
  redis.call('PUBLISH', reply_to, ARGV[1] .. '\n' .. id .. '\n' .. ARGV[2])
end
return 1
