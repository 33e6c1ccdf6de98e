-- Hot parameters: one value's token bucket (Sentinel's ParamFlowChecker) or pacing.
-- KEYS[1]  the value's hash: t = ms of the last refill (bucket) or of the last reserved
--          pass (queue), n = tokens left (bucket)
-- ARGV[1]  mode: 0 = token bucket (reject), 1 = pacing (queue)
-- ARGV[2]  count: tokens per duration for this value (> 0)
-- ARGV[3]  burst: extra tokens a full bucket holds
-- ARGV[4]  duration in ms
-- ARGV[5]  max_queue_ms (queue)
-- returns  {admitted 1|0, ms to wait (queue: before going; refused: until a retry could
--          pass) as text, tokens left, slot as text (for a refund)}
local mode = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local dur = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(string.format('%.3f', tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000))
local fmt = function(x) return string.format('%.3f', x) end
local v = redis.call('HMGET', KEYS[1], 't', 'n')

if mode == 0 then
  local full = count + burst
  -- A value untouched this long has a full bucket again: its key may go.
  local ttl = math.ceil(dur * full / count) + 1
  if not v[1] then
    redis.call('HSET', KEYS[1], 't', fmt(now), 'n', full - 1)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, '0', full - 1, fmt(now)}
  end
  local last = tonumber(v[1])
  local rest = tonumber(v[2])
  local passed = now - last
  if passed > dur then
    -- Refill once a whole duration has passed since the last refill.
    local add = math.floor(passed * count / dur)
    local left = rest + add - 1
    if add + rest > full then left = full - 1 end
    redis.call('HSET', KEYS[1], 't', fmt(now), 'n', left)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, '0', left, fmt(now)}
  end
  if rest >= 1 then
    redis.call('HINCRBY', KEYS[1], 'n', -1)
    return {1, '0', rest - 1, v[1]}
  end
  return {0, fmt(last + dur - now + 1), 0, v[1]}
end

-- Pacing: calls of one value are spaced dur / count ms apart (Sentinel rounds to ms).
local cost = math.floor(dur / count + 0.5)
local maxq = tonumber(ARGV[5])
local last = v[1] and tonumber(v[1])
if not last or last + cost <= now then
  redis.call('HSET', KEYS[1], 't', fmt(now))
  redis.call('PEXPIRE', KEYS[1], cost + 1)
  return {1, '0', 0, fmt(now)}
end
local expected = last + cost
local wait = expected - now
if wait <= maxq then
  redis.call('HSET', KEYS[1], 't', fmt(expected))
  redis.call('PEXPIRE', KEYS[1], math.ceil(wait + cost) + 1)
  return {1, fmt(wait), 0, fmt(expected)}
end
return {0, fmt(wait - maxq), 0, ''}
