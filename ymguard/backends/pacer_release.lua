-- Give back a reserved slot: its waiter left (cancelled, client gone) or a later check
-- blocked the call. The latest slot rolls the line back; an earlier one still to come is
-- kept as a freed slot for the next caller; one already past frees nothing.
-- KEYS[1]  the hash of warmup_lib.lua
-- ARGV[1]  the slot (server ms)
-- ARGV[2]  its cost in ms
-- ARGV[3]  n
-- ARGV[4]  1 if passes are counted (warm-up), else 0
-- returns  1 if the slot was given back for another caller, else 0
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local at, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[4] == '1' then
  local b = string.format('%d', math.floor(at / 100))
  if redis.call('HEXISTS', KEYS[1], b) == 1 then
    redis.call('HINCRBY', KEYS[1], b, -tonumber(ARGV[3]))
  end
end
local latest = tonumber(redis.call('HGET', KEYS[1], 'l') or '-1')
if at == latest then
  redis.call('HSET', KEYS[1], 'l', string.format('%d', at - cost))
  return 1
end
if at > now then
  redis.call('HSET', KEYS[1], 'h' .. string.format('%d', at), cost)
  return 1
end
return 0
