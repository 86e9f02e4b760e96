-- KEYS: job, lease, queue (the new deployment's provider queue)   ARGV: execution, spec (JSON), message
-- -> 1 if the job went back to queued with the new spec and its message onto the queue (one step: a
--    moved job is never queued twice nor lost between two queues), else 0
if not job_requeue(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[3], ARGV[3])
return 1
