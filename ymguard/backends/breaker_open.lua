-- Trip a breaker: CLOSED -> OPEN. A no-op in any other state (another process won).
-- KEYS[1]  hash of the breaker (fields in breaker_lib.lua)
-- KEYS[2]  channel every transition is published on ("version,state,probe_in_ms,lease_in_ms")
-- ARGV[1]  open_ms: how long it stays open before one probe may pass
-- returns  {changed 1|0, state, version, ms until the probe, ms until the probe lease ends}
-- (t, now, h, s, v, p, l come from breaker_lib.lua)
if s ~= 0 then
  return {0, s, v, p - now, l - now}
end
-- The version is server microseconds, so it keeps growing even if the hash expired.
local nv = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), v + 1)
local open_ms = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 's', 1, 'v', string.format('%.0f', nv),
  'p', string.format('%.0f', now + open_ms), 'o', '', 'l', 0)
redis.call('PEXPIRE', KEYS[1], 86400000 + open_ms)
redis.call('PUBLISH', KEYS[2], string.format('%.0f,1,%.0f,0', nv, open_ms))
return {1, 1, nv, open_ms, 0}
