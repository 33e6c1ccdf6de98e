-- Give back permits a call took but did not use (a later check blocked it).
-- KEYS[1]  the window hash of window_acquire.lua
-- ARGV[1]  the slot the permits were counted in
-- ARGV[2]  how many permits to give back
-- returns  1 if the slot was still in the window and was refunded, else 0
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
  return 1
end
return 0
