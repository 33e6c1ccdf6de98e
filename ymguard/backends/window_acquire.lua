-- Sliding window of buckets: admit `n` if the window's total stays within `limit`.
-- KEYS[1]  hash: field = bucket slot number (server ms / bucket length), value = count
-- ARGV[1]  limit (permits per window)
-- ARGV[2]  window length in ms
-- ARGV[3]  number of buckets in the window
-- ARGV[4]  n, the permits this call wants
-- ARGV[5]  (optional) "1": take part of n if not all of it fits (prefetching): at most
--          half of what is left, at least 1; the reply then also carries the permits
--          taken and the microseconds left in the slot's bucket
-- returns  {admitted 1|0, remaining after this call, ms until this call could succeed
--          (0 when admitted), slot[, taken, us left in the bucket]}
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local buckets = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local partial = ARGV[5] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local blen = window / buckets
local slot = math.floor(now / blen)
local first = slot - buckets + 1
local field = string.format('%d', slot)

local flat = redis.call('HGETALL', KEYS[1])
local total, stale = 0, {}
for i = 1, #flat, 2 do
  if tonumber(flat[i]) < first then
    stale[#stale + 1] = flat[i]
  else
    total = total + tonumber(flat[i + 1])
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end

if partial then
  -- Prefetching: what fits, up to half of what is left (others may want some); a
  -- refusal is about one permit.
  n = math.max(1, math.min(n, math.ceil((limit - total) / 2)))
end

if total + n <= limit then
  -- The hot path: count the call; nobody reads a wait for an admitted call. Only a
  -- call that opens a new bucket moves the expiry (the newest bucket decides it).
  if redis.call('HINCRBY', KEYS[1], field, n) == n then
    redis.call('PEXPIRE', KEYS[1], math.ceil(window + blen))
  end
  if partial then
    -- From the clock's microseconds, not `now` (whole ms): the bucket's end, not later.
    local left = (slot + 1) * blen * 1000 - (tonumber(t[1]) * 1000000 + tonumber(t[2]))
    return {1, limit - total - n, 0, field, n, math.floor(left)}
  end
  return {1, limit - total - n, 0, field}
end

-- Refused: when will the oldest counts leave the window far enough for this call?
local live = {}
for i = 1, #flat, 2 do
  local s = tonumber(flat[i])
  if s >= first then
    live[#live + 1] = {s, tonumber(flat[i + 1])}
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local wait, freed = window, 0
for i = 1, #live do
  freed = freed + live[i][2]
  if total - freed + n <= limit then
    wait = (live[i][1] + buckets) * blen - now
    break
  end
end
local remaining = limit - total
if remaining < 0 then remaining = 0 end
if partial then
  return {0, remaining, math.ceil(wait), field, 0, 0}
end
return {0, remaining, math.ceil(wait), field}
