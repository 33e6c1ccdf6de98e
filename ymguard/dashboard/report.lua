-- One process's report, once a second, atomically (ymguard/dashboard/reporter.py).
-- KEYS[1] the index of processes (a sorted set: id -> last report, ms on the server clock)
-- KEYS[2] this process's key (its JSON description, expiring after ARGV[3] ms)
-- KEYS[3..] the cluster's per-second hashes ("resource\nfield" -> sum over processes)
-- ARGV[1] process id, ARGV[2] its JSON, ARGV[3] process TTL (ms), ARGV[4] series TTL (s),
-- ARGV[5..] per second key: a JSON array of field, increment, field, increment, ...
-- Returns the server's TIME (the reporter aligns its seconds on it).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl_ms)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - ttl_ms)
redis.call('PEXPIRE', KEYS[1], ttl_ms * 4)
for i = 3, #KEYS do
  local incs = cjson.decode(ARGV[i + 2])
  for j = 1, #incs, 2 do
    redis.call('HINCRBYFLOAT', KEYS[i], incs[j], incs[j + 1])
  end
  redis.call('EXPIRE', KEYS[i], ARGV[4])
end
return t
