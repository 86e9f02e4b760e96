-- KEYS: line, keyof, keyblock, then the call's scopes' permit keys
-- ARGV: one JSON object: call, tokens (reserved), actual (-1 = keep the reservation), refund, key
--       ('' = no key scope), keyed, wake, window_ms, day_ms, lease_ms, scopes
-- Settles every permit the call took (permits.lua settle steps), lifts its API key's block (the call
-- that held the key's quota ended, so it may have room again) and wakes the line's head.
local a = cjson.decode(ARGV[1])
local now = now_ms()
local actual = a.actual
if a.refund then actual = 0 end
local c = {now = now, call = a.call, tokens = a.tokens, actual = actual, refund = a.refund,
           window_ms = a.window_ms, day_ms = a.day_ms, lease_ms = a.lease_ms}
permits_apply(permits_open(a.scopes, 4), c, 'settle')
if a.key ~= '' then redis.call('HDEL', KEYS[3], a.key) end
wake_head({line = KEYS[1], keyof = KEYS[2], blocks = KEYS[3], keyed = a.keyed, wake = a.wake}, now)
return 1
