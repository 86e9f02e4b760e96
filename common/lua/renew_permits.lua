-- KEYS: the call's concurrency keys   ARGV: call, lease_ms
-- The call still runs: push its concurrency leases out (a dead worker's lapse instead).
local now = now_ms()
for _, conc in ipairs(KEYS) do redis.call('ZADD', conc, 'XX', now + tonumber(ARGV[2]), ARGV[1]) end
return 1
