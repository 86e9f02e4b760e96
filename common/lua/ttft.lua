-- Feed one measured time to first token into an alias's decaying average (common/routing/ttft.py).
-- KEYS[1] the hash of averages (one field per alias: "<ms> <at_s>")
-- ARGV: alias, sample_ms, alpha (a new sample's weight), half_life_s (how fast an old average fades
--       during silence), ttl_s (the hash vanishes when nothing is measured for this long)
-- Invariant: one field per alias fed (workers only feed the registry's aliases: the hash is bounded);
-- after a silence of h half-lives the old average weighs (1 - alpha) * 2^-h against the new sample.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local sample = tonumber(ARGV[2])
local alpha = tonumber(ARGV[3])
local half_life = tonumber(ARGV[4])
local value = sample
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local sep = string.find(raw, ' ', 1, true)
  local old = tonumber(string.sub(raw, 1, sep - 1))
  local at = tonumber(string.sub(raw, sep + 1))
  if old and at then
    local keep = (1 - alpha) * math.pow(2, -math.max(0, now - at) / half_life)
    value = keep * old + (1 - keep) * sample
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.3f %.3f', value, now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return tostring(value)
