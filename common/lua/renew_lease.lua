-- KEYS: lease   ARGV: execution, ttl_ms   -> 1 if the lease is still ours and was renewed
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
