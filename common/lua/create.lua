-- KEYS: job, queue   ARGV: spec (JSON), max_wait_s, reply_to, ttl_s, message, only_if_missing (1/0),
--                           alive_ms (the waiting API process's heartbeat TTL), limited (1/0: the
--                           spec carries its key's own limits, so a plain claim must not start it)
-- -> creation time (epoch s, Redis clock), or '' if only_if_missing and the job exists.
-- Records the job and pushes its queue message in one step: a job is never queued without its
-- state, nor recorded without being queued.
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local now = now_ms()
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'queued', 'created_at', stamp(now),
           'deadline', stamp(now + tonumber(ARGV[2]) * 1000), 'reply_to', ARGV[3], 'attempts', 0)
if ARGV[8] == '1' then redis.call('HSET', KEYS[1], 'limited', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[5]) end
-- the caller is alive now: its heartbeat is renewed with the job, so a Redis that lost the heartbeat
-- (a restart or wipe) never makes a worker cancel a fresh sync job as orphaned (job.lua)
if ARGV[3] ~= '' then redis.call('SET', ARGV[3] .. ':alive', 1, 'PX', ARGV[7]) end
return stamp(now)
