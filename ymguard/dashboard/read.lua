-- What the dashboard reads in one call (ymguard/dashboard/reporter.py).
-- KEYS[1] the index of processes, KEYS[2..] per-second hashes; ARGV[1] process TTL (ms).
-- Returns {TIME, ids of the processes seen within the TTL, HGETALL of each second key}.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now_ms - tonumber(ARGV[1]), '+inf')
local seconds = {}
for i = 2, #KEYS do
  seconds[i - 1] = redis.call('HGETALL', KEYS[i])
end
return {t, ids, seconds}
