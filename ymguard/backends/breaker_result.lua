-- The probe's outcome: HALF_OPEN -> CLOSED (ok) or -> OPEN with a fresh timer (failed,
-- slow, blocked or cancelled). Ignored unless the caller still owns the probe.
-- KEYS[1]  hash of the breaker (fields in breaker_lib.lua)
-- KEYS[2]  channel every transition is published on
-- ARGV[1]  probe owner id given to breaker_probe.lua
-- ARGV[2]  1 to close, 0 to re-open
-- ARGV[3]  open_ms for a re-open
-- returns  {changed 1|0, state, version, ms until the probe, ms until the probe lease ends}
-- (t, now, h, s, v, p, l come from breaker_lib.lua)
if s ~= 2 or h[5] ~= ARGV[1] then
  return {0, s, v, p - now, l - now}
end
local nv = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), v + 1)
local snv = string.format('%.0f', nv)
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 's', 0, 'v', snv, 'p', 0, 'o', '', 'l', 0)
  redis.call('PEXPIRE', KEYS[1], 86400000)
  redis.call('PUBLISH', KEYS[2], snv .. ',0,0,0')
  return {1, 0, nv, 0, 0}
end
local open_ms = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 's', 1, 'v', snv,
  'p', string.format('%.0f', now + open_ms), 'o', '', 'l', 0)
redis.call('PEXPIRE', KEYS[1], 86400000 + open_ms)
redis.call('PUBLISH', KEYS[2], string.format('%s,1,%.0f,0', snv, open_ms))
return {1, 1, nv, open_ms, 0}
