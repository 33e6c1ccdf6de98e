-- Change the shared permit count, and wake the waiters a larger count lets in.
-- KEYS     see permit_lib.lua (holders, permits, line, places)
-- ARGV[1]  'set' (the count becomes ARGV[2]) or 'add' (the count grows by ARGV[2], may be < 0)
-- ARGV[2]  n
-- ARGV[3]  permits (used while KEYS[2] does not exist)
-- ARGV[4]  the wake-up channel
-- returns  the new permit count (never below 0)
local n = tonumber(ARGV[2])
if ARGV[1] == 'add' then
  n = permit_count(ARGV[3]) + n
end
if n < 0 then
  n = 0
end
redis.call('SET', KEYS[2], n)
wake(ARGV[4], n - redis.call('ZCARD', KEYS[1]))
return n
