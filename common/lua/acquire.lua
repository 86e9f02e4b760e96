-- KEYS: line, vt, owner, cooldown, job, job_lease, keyof, keyblock, next, then every scope's permit keys
-- ARGV: one JSON object: job_id, execution, job_lease_ms, call, lease_ms, tokens, key, weight, proc,
--       rewait, wake, job_prefix, proc_prefix, keyed, window_ms, day_ms, scopes (see permits_open)
-- -> {'run', attempt, queue_wait_s} | {'wait', rank, wait_ms} | {'expired'} | {'gone', why, lost attempt}
--    | {'too_large', kind, limit, scope index}
-- All permits or none, and the claim, in one step: the line's head takes every permit of every scope
-- and starts (job_start, as the plain claim does) only if all have room.
local a = cjson.decode(ARGV[1])
local now = now_ms()
local L = {line = KEYS[1], vt = KEYS[2], owner = KEYS[3], keyof = KEYS[7], blocks = KEYS[8],
           keyed = a.keyed, wake = a.wake, job_prefix = a.job_prefix, proc_prefix = a.proc_prefix}
local JOB, LEASE = KEYS[5], KEYS[6]

if not a.rewait then   -- a job back after an upstream 429 is already running: nothing to check
  local refusal, lost = job_check(JOB, LEASE, now)
  if refusal then
    line_leave(L, a.job_id, now)
    if refusal == 'expired' then return {'expired'} end
    return {'gone', refusal, lost}
  end
  redis.call('HSET', JOB, 'holder', a.proc)   -- this worker process holds the delivery while it waits
end

line_join(L, a.job_id, a.key, a.weight, a.proc, a.rewait)
local turn = line_turn(L, a.job_id, now)
if turn then return turn end

local cooldown = redis.call('PTTL', KEYS[4])
if cooldown > 0 then return {'wait', 0, cooldown} end

local c = {now = now, call = a.call, tokens = a.tokens, lease_ms = a.lease_ms, window_ms = a.window_ms,
           day_ms = a.day_ms}
local scopes = permits_open(a.scopes, 10)
local wait, key_wait, limit, index = permits_check(scopes, c)
if wait == false then return {'too_large', key_wait, limit, index} end
if key_wait > 0 then
  line_block_key(L, a.key, now + key_wait, now)
  return {'wait', 0, key_wait}
end
if wait > 0 then
  redis.call('SET', KEYS[9], now + wait, 'PX', wait)
  return {'wait', 0, wait}
end

permits_apply(scopes, c, 'take')
line_admit(L, a.job_id, now)
if a.rewait then return {'run', 0, '0'} end
local attempt, waited = job_start(JOB, LEASE, a.execution, a.job_lease_ms, now, a.proc)
return {'run', attempt, waited}
