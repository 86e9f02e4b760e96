-- KEYS: events, job
-- ARGV: job_id, ttl_ms, then the events (JSON, in order; never a final one: only emit.lua settles a job)
-- -> the number of events appended
-- A stream's chunks, batched: each is its own entry of the job's event stream (a caller that reconnects
-- or subscribes late replays them from there, in order), and all of them go to the waiting API process
-- in ONE message: job_id, then a stream id and an event per chunk, each on its own line (compact JSON
-- has no raw newline). One event makes the very message emit.lua publishes.
local parts = {ARGV[1]}
for i = 3, #ARGV do
  parts[#parts + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 10000, '*', 'e', ARGV[i])
  parts[#parts + 1] = ARGV[i]
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local reply_to = redis.call('HGET', KEYS[2], 'reply_to')
if reply_to and reply_to ~= '' then
  redis.call('PUBLISH', reply_to, table.concat(parts, '\n'))
end
return #ARGV - 2
