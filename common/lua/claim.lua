-- KEYS: job, lease   ARGV: execution, lease_ms, with_spec (1/0: the worker has not read the spec yet),
--                          holder (the worker process id, recorded in the job hash)
-- -> {'run', attempt, queue_wait_s[, spec, deadline]} | {why not: missing | expired | busy | <terminal>,
--    the attempt a dead worker lost (0: none)} | {'limited', 0, spec, deadline}
-- A worker that claims with_spec has not read the spec, so it did not know the job's key has limits
-- of its own (the job's 'limited' flag): such a job is not started here but handed back to wait in
-- its provider's line (acquire.lua claims it there).
local now = now_ms()
local refusal, lost = job_check(KEYS[1], KEYS[2], now)
if refusal then return {refusal, lost} end
if ARGV[3] == '1' and redis.call('HGET', KEYS[1], 'limited') == '1' then
  local job = redis.call('HMGET', KEYS[1], 'spec', 'deadline')
  return {'limited', 0, job[1], job[2]}
end
local attempt, waited = job_start(KEYS[1], KEYS[2], ARGV[1], ARGV[2], now, ARGV[4])
if ARGV[3] ~= '1' then return {'run', attempt, waited} end
local job = redis.call('HMGET', KEYS[1], 'spec', 'deadline')
return {'run', attempt, waited, job[1], job[2]}
