-- Leased permits: take one if fewer than `permits` unexpired leases are held.
-- KEYS[1]  sorted set: member = permit id, score = lease expiry (server ms)
-- KEYS[2]  string: the permit count set at run time (set_permits), if any
-- ARGV[1]  permits (used when KEYS[2] does not exist)
-- ARGV[2]  lease length in ms
-- ARGV[3]  the new permit's id
-- returns  {1, expiry ms} when taken, or {0, ms until the soonest lease expires (-1: none)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local permits = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
if redis.call('ZCARD', KEYS[1]) < permits then
  local expiry = now + lease
  redis.call('ZADD', KEYS[1], expiry, ARGV[3])
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  return {1, expiry}
end
local soonest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #soonest == 0 then
  return {0, -1}
end
return {0, tonumber(soonest[2]) - now}
