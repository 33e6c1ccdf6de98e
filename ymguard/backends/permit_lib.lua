-- The prelude of every permit_*.lua script: prepended to each by semaphore.py, never run alone.
-- KEYS[1]  holders: sorted set, member = permit id, score = lease expiry (server ms)
-- KEYS[2]  permits: string, the shared permit count (set_permits), absent until set
-- KEYS[3]  line: sorted set, member = waiter id, score = arrival (server µs), first come first
-- KEYS[4]  places: sorted set, member = waiter id, score = when its place lapses (server ms)
-- Every script first drops lapsed leases and places, so a holder or waiter that died frees its
-- permit or its place without a background job (lazy reclaim), by the server's clock.
-- `queued` (the line's length) is kept up to date by the scripts: with nobody in line, the
-- line costs one ZCARD and nothing is published.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reclaimed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local queued = redis.call('ZCARD', KEYS[3])
if queued > 0 then
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  -- unpack() has a small stack: remove lapsed places in chunks
  for i = 1, #lapsed, 500 do
    local chunk = {unpack(lapsed, i, math.min(i + 499, #lapsed))}
    local gone = redis.call('ZREM', KEYS[3], unpack(chunk))
    redis.call('ZREM', KEYS[4], unpack(chunk))
    queued = queued - gone
    reclaimed = reclaimed + gone
  end
end

local function permit_count(default)
  return tonumber(redis.call('GET', KEYS[2]) or default)
end

-- Tell the first `free` waiters in line that a permit is theirs to take (one PUBLISH, and
-- only when someone waits: the uncontended path publishes nothing).
local function wake(channel, free)
  if free <= 0 or queued <= 0 or channel == '' then
    return
  end
  local ids = redis.call('ZRANGE', KEYS[3], 0, free - 1)
  if #ids > 0 then
    redis.call('PUBLISH', channel, table.concat(ids, ' '))
  end
end

-- Take `id` out of the line (if it is in it); returns 1 if it was.
local function leave(id)
  if queued <= 0 then
    return 0
  end
  local left = redis.call('ZREM', KEYS[3], id)
  if left > 0 then
    redis.call('ZREM', KEYS[4], id)
    queued = queued - 1
  end
  return left
end

local function keep_for(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end
