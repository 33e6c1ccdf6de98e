-- Give a leased permit back.
-- KEYS[1]  the sorted set of permit_acquire.lua
-- ARGV[1]  the permit id
-- returns  1 if the permit was still held (its lease had not expired), else 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZREM', KEYS[1], ARGV[1])
