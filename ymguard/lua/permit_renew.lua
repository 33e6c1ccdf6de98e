-- Extend a held permit's lease.
-- KEYS[1]  the sorted set of permit_acquire.lua
-- ARGV[1]  the permit id
-- ARGV[2]  the new lease length in ms, counted from now
-- returns  the new expiry in server ms, or 0 if the permit had expired (it is not revived)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return now + lease
