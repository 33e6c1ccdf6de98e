-- Give back what param_bucket_acquire.lua granted a call that did not go ahead (a later
-- check blocked it, or it was cancelled while it waited for its slot).
-- KEYS[1]  the value's hash of param_bucket_acquire.lua
-- ARGV[1]  mode: 0 = token bucket, 1 = pacing
-- ARGV[2]  the slot the acquire returned
-- ARGV[3]  count, ARGV[4] burst, ARGV[5] duration in ms (as the acquire had them)
-- returns  1 if something was given back, else 0
local v = redis.call('HMGET', KEYS[1], 't', 'n')
if not v[1] then
  return 0
end
local count = tonumber(ARGV[3])
if tonumber(ARGV[1]) == 0 then
  -- Only a token of the current refill goes back, and never past a full bucket.
  if v[1] == ARGV[2] and tonumber(v[2]) < count + tonumber(ARGV[4]) then
    redis.call('HINCRBY', KEYS[1], 'n', 1)
    return 1
  end
  return 0
end
-- Pacing: only the last slot of the schedule goes back (its end moves back one spacing).
-- A slot with later slots after it stays taken: pulling the end back would give the next
-- caller a slot a waiter already holds (two calls of the value at once).
if v[1] == ARGV[2] then
  local cost = math.floor(tonumber(ARGV[5]) / count + 0.5)
  redis.call('HSET', KEYS[1], 't', string.format('%.3f', tonumber(v[1]) - cost))
  return 1
end
return 0
