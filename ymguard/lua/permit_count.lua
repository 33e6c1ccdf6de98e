-- Count the unexpired leases.
-- KEYS[1]  the sorted set of permit_acquire.lua
-- returns  the number of permits held now
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
