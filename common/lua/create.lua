-- KEYS: job, queue   ARGV: spec (JSON), max_wait_s, reply_to, ttl_s, message, only_if_missing (1/0),
--                           alive_ms (the waiting API process's heartbeat TTL), limited (1/0: the
--                           spec carries its key's own limits, so a plain claim must not start it),
--                           budgets: count n, the call's worst case (units of 1e-10 USD, tokens), how
--                           long its reservation may live (ms), then n budget hash keys (budget.lua)
-- -> creation time (epoch s, Redis clock), or '' if only_if_missing and the job exists; with budgets
--    {'ok', creation time, then each budget's spent, reserved, limit, tspent, treserved, tlimit after
--    the reservation}, or a budget's refusal: {'cold', i} (budget i's hash is missing: rebuild it and
--    try again) or {'over', i, its six numbers} — then nothing was recorded or queued.
-- Records the job and pushes its queue message in one step: a job is never queued without its
-- state, nor recorded without being queued.
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local now = now_ms()
-- The budget check and the reservation happen in this same step as the job's creation and queueing:
-- concurrent calls can never both take the last of a budget (common/budgetstate.py).
local nbudgets = tonumber(ARGV[9] or '0')
for i = 1, nbudgets do
  local why, numbers = budget_check(ARGV[12 + i], ARGV[10], ARGV[11], now)
  if why == 'cold' then return {'cold', i} end
  if why == 'over' then return {'over', i, unpack(numbers)} end
end
if nbudgets > 0 then
  local keys = {}
  for i = 1, nbudgets do
    budget_reserve(ARGV[12 + i], KEYS[1], ARGV[10], ARGV[11], now + tonumber(ARGV[12]))
    keys[i] = ARGV[12 + i]
  end
  redis.call('HSET', KEYS[1], 'budgets', table.concat(keys, ' '), 'bres', ARGV[10] .. ' ' .. ARGV[11])
end
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'queued', 'created_at', stamp(now),
           'deadline', stamp(now + tonumber(ARGV[2]) * 1000), 'reply_to', ARGV[3], 'attempts', 0)
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'limited', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[5]) end
-- the caller is alive now: its heartbeat is renewed with the job, so a Redis that lost the heartbeat
-- (a restart or wipe) never makes a worker cancel a fresh sync job as orphaned (job.lua)
if ARGV[3] ~= '' then redis.call('SET', ARGV[3] .. ':alive', 1, 'PX', ARGV[7]) end
if nbudgets == 0 then return stamp(now) end
-- what is left of each budget (the answer's headers say it without another round trip)
local out = {'ok', stamp(now)}
for i = 1, nbudgets do
  local b = redis.call('HMGET', ARGV[12 + i], 'spent', 'reserved', 'limit', 'tspent', 'treserved', 'tlimit')
  for j = 1, 6 do out[#out + 1] = b[j] or '0' end
end
return out
