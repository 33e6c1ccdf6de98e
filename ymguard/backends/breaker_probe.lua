-- Become the one probe: OPEN -> HALF_OPEN once the open timer has passed, or take over a
-- half-open breaker whose probe's lease ran out (its process died). Only one caller wins.
-- KEYS[1]  hash of the breaker (fields in breaker_lib.lua)
-- KEYS[2]  channel every transition is published on
-- ARGV[1]  probe owner id (random, per attempt)
-- ARGV[2]  lease_ms: after this long another caller may probe
-- returns  {won 1|0, state, version, ms until the probe, ms until the probe lease ends}
-- (t, now, h, s, v, p, l come from breaker_lib.lua)
if s == 0 or (s == 1 and now < p) or (s == 2 and now < l) then
  return {0, s, v, p - now, l - now}
end
local nv = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), v + 1)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 's', 2, 'v', string.format('%.0f', nv),
  'o', ARGV[1], 'l', string.format('%.0f', now + lease))
redis.call('PEXPIRE', KEYS[1], 86400000 + lease)
redis.call('PUBLISH', KEYS[2], string.format('%.0f,2,0,%.0f', nv, lease))
return {1, 2, nv, 0, lease}
