-- Sliding window of buckets: admit `n` if the window's total stays within `limit`.
-- KEYS[1]  hash: field = bucket slot number (server ms / bucket length), value = count
-- ARGV[1]  limit (permits per window)
-- ARGV[2]  window length in ms
-- ARGV[3]  number of buckets in the window
-- ARGV[4]  n, the permits this call wants
-- returns  {admitted 1|0, remaining after this call, ms until the window frees room, slot}
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local buckets = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local blen = window / buckets
local slot = math.floor(now / blen)
local first = slot - buckets + 1

local flat = redis.call('HGETALL', KEYS[1])
local total, stale, live = 0, {}, {}
for i = 1, #flat, 2 do
  local s = tonumber(flat[i])
  if s < first then
    stale[#stale + 1] = flat[i]
  else
    local c = tonumber(flat[i + 1])
    total = total + c
    live[#live + 1] = {s, c}
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end

table.sort(live, function(a, b) return a[1] < b[1] end)
local admitted = 0
if total + n <= limit then
  admitted = 1
  total = total + n
  redis.call('HINCRBY', KEYS[1], string.format('%d', slot), n)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window + blen))
  live[#live + 1] = {slot, n}
  table.sort(live, function(a, b) return a[1] < b[1] end)
end

-- When will the oldest counts leave the window far enough for one more call?
local wait = window
local need = admitted == 1 and 1 or n
local freed = 0
for i = 1, #live do
  freed = freed + live[i][2]
  if total - freed + need <= limit then
    wait = (live[i][1] + buckets) * blen - now
    break
  end
end
local remaining = limit - total
if remaining < 0 then remaining = 0 end
return {admitted, remaining, math.ceil(wait), string.format('%d', slot)}
