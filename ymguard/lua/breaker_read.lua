-- Read a breaker's state, with its timers relative to the server clock (a process
-- refreshes its local copy with it after (re)subscribing to the transitions).
-- KEYS[1]  hash of the breaker (fields as in breaker_open.lua)
-- returns  {0, state, version (0: no hash, i.e. closed), ms until the probe,
--           ms until the probe lease ends}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 's', 'v', 'p', 'l')
local s = tonumber(h[1]) or 0
local v = tonumber(h[2]) or 0
local p = tonumber(h[3]) or 0
local l = tonumber(h[4]) or 0
return {0, s, v, p - now, l - now}
