-- Give a leased permit back, or leave the line; wake the waiters it lets in.
-- KEYS     see permit_lib.lua (holders, permits, line, places)
-- ARGV[1]  the permit id (or waiter id)
-- ARGV[2]  permits (used while KEYS[2] does not exist)
-- ARGV[3]  the wake-up channel
-- returns  1 if the permit was still held (its lease had not expired), else 0
local held = redis.call('ZREM', KEYS[1], ARGV[1])
local left = leave(ARGV[1])
if queued > 0 and held + left + reclaimed > 0 then
  wake(ARGV[3], permit_count(ARGV[2]) - redis.call('ZCARD', KEYS[1]))
end
return held
