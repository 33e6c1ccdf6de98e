-- Read a semaphore: permits held, the permit count, waiters in line.
-- KEYS     see permit_lib.lua (holders, permits, line, places)
-- ARGV[1]  permits (used while KEYS[2] does not exist)
-- ARGV[2]  the wake-up channel
-- returns  {held, permits, waiting}
local permits = permit_count(ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if reclaimed > 0 and queued > 0 then
  wake(ARGV[2], permits - held)
end
return {held, permits, queued}
