-- The prelude of warmup_acquire.lua and pacer_acquire.lua: the state of one shaped rule and
-- Sentinel's warm-up token bucket (WarmUpController). Prepended by warmup.py / pacer.py.
-- KEYS[1]  hash: t = stored tokens, f = when they were last filled (server ms, a whole
--          second), l = (pacer) the latest slot handed out (server ms), h<ms> = (pacer) a
--          slot freed by a waiter that left, = its cost in ms; <n> = calls passed in the
--          100 ms bucket n (server ms / 100), kept for two seconds
-- Buckets older than two seconds and freed slots already past are dropped here.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local slot = math.floor(now / 100)
local flat = redis.call('HGETALL', KEYS[1])
local state, buckets, holes, stale = {}, {}, {}, {}
for i = 1, #flat, 2 do
  local name, value = flat[i], flat[i + 1]
  local b = tonumber(name)
  if b then
    if b < slot - 19 then stale[#stale + 1] = name else buckets[b] = tonumber(value) end
  elseif string.sub(name, 1, 1) == 'h' then
    local at = tonumber(string.sub(name, 2))
    if at < now then stale[#stale + 1] = name else holes[#holes + 1] = at end
  else
    state[name] = tonumber(value)
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end

-- Calls passed in the buckets first..last.
local function passed(first, last)
  local n = 0
  for b, c in pairs(buckets) do
    if b >= first and b <= last then n = n + c end
  end
  return n
end

local function count_pass(at, n)
  local b = math.floor(at / 100)
  redis.call('HINCRBY', KEYS[1], string.format('%d', b), n)
  buckets[b] = (buckets[b] or 0) + n
end

-- Sentinel's syncToken: once a second, refill the stored tokens by elapsed * count (above
-- the warning line only while the previous second passed fewer than count / cold_factor)
-- up to max_tokens, then take off the previous second's passes. Returns the tokens.
local function sync_tokens(count, warning, max_tokens, cold_factor)
  local sec = now - now % 1000
  local filled = state['f'] or 0
  local old = state['t'] or 0
  if sec <= filled then
    return old
  end
  local prev = passed(sec / 100 - 10, sec / 100 - 1)
  local new = old
  if old < warning or (old > warning and prev < math.floor(count) / cold_factor) then
    new = old + (sec - filled) * count / 1000
  end
  if new > max_tokens then new = max_tokens end
  new = new - prev
  if new < 0 then new = 0 end
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', new), 'f', string.format('%d', sec))
  return new
end

-- The rate the stored tokens allow: 1 / ((tokens - warning) * slope + 1 / count) above the
-- warning line (Sentinel's warningQps, nudged up like its Math.nextUp), else count.
local function warm_rate(tokens, count, warning, slope)
  if tokens >= warning then
    return 1 / ((tokens - warning) * slope + 1 / count) * (1 + 1e-12)
  end
  return count
end
