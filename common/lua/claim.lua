-- KEYS: job, lease   ARGV: execution, lease_ms, with_spec (1/0: the worker has not read the spec yet)
-- -> {'run', attempt, queue_wait_s[, spec, deadline]} | {why not: missing | expired | busy | <terminal>}
local now = now_ms()
local refusal = job_check(KEYS[1], KEYS[2], now)
if refusal then return {refusal} end
local attempt, waited = job_start(KEYS[1], KEYS[2], ARGV[1], ARGV[2], now)
if ARGV[3] ~= '1' then return {'run', attempt, waited} end
local job = redis.call('HMGET', KEYS[1], 'spec', 'deadline')
return {'run', attempt, waited, job[1], job[2]}
