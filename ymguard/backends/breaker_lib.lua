-- The prelude of every breaker_*.lua script: prepended to each by breaker.py (through
-- lua(name, prelude="breaker_lib")), never run alone.
-- KEYS[1]  hash of the breaker: s state (0 closed, 1 open, 2 half-open; missing = closed),
--          v version (grows with every transition), p next probe at (server ms),
--          o probe owner, l probe lease until (server ms)
-- Sets: t (the server TIME), now (server ms), h (the hash's s, v, p, l, o), and s, v, p, l
-- as numbers (a missing hash reads as closed, version 0).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 's', 'v', 'p', 'l', 'o')
local s = tonumber(h[1]) or 0
local v = tonumber(h[2]) or 0
local p = tonumber(h[3]) or 0
local l = tonumber(h[4]) or 0
