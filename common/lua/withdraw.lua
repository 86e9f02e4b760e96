-- KEYS: job   ARGV: new_state (expired | cancelled), job_id, wake channel  -> the job's state afterwards
-- Only a queued job can be withdrawn: whoever moves a job out of 'queued' first wins. A withdrawn job
-- may wait in a provider's line at a worker (line.lua): the wake tells that worker to take it out now,
-- so a withdrawn head never holds up the jobs behind it.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return state or 'missing' end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', stamp(now_ms()))
budget_settle(KEYS[1], '0', '0')  -- it never ran: its budget reservation is refunded whole
redis.call('PUBLISH', ARGV[3], ARGV[2])
return ARGV[1]
