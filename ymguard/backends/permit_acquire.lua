-- Leased permits: take one if this caller is within the free permits, counting the line.
-- KEYS     see permit_lib.lua (holders, permits, line, places)
-- ARGV[1]  permits (used while KEYS[2] does not exist)
-- ARGV[2]  lease length in ms
-- ARGV[3]  the caller's permit id (also its waiter id)
-- ARGV[4]  place ms: > 0 joins the line (or keeps the caller's place) for this long when no
--          permit is free; 0 takes only a free permit and leaves the line if the caller was in it
-- ARGV[5]  the wake-up channel
-- returns  {1, expiry ms} when taken, or
--          {0, ms until a lease expiry could let this caller in (-1: none will), line length}
local lease = tonumber(ARGV[2])
local id = ARGV[3]
local place = tonumber(ARGV[4])
local free = permit_count(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local rank = false
if queued > 0 then
  rank = redis.call('ZRANK', KEYS[3], id)
end
-- A newcomer stands behind everyone in line: no barging past waiters.
local pos = rank or queued
if pos < free then
  local expiry = now + lease
  redis.call('ZADD', KEYS[1], expiry, id)
  keep_for(KEYS[1], lease)
  if rank then
    leave(id)
  end
  if reclaimed > 0 then
    wake(ARGV[5], free - 1)
  end
  return {1, expiry}
end
if place > 0 then
  if not rank then
    redis.call('ZADD', KEYS[3], now_us, id)
    queued = queued + 1
  end
  redis.call('ZADD', KEYS[4], now + place, id)
  keep_for(KEYS[3], place)
  keep_for(KEYS[4], place)
elseif rank then
  reclaimed = reclaimed + leave(id)
end
if reclaimed > 0 then
  wake(ARGV[5], free)
end
-- The caller gets in once (pos - free + 1) leases have ended: the (pos - free)-th expiry.
local idx = pos - free
local lease_end = redis.call('ZRANGE', KEYS[1], idx, idx, 'WITHSCORES')
if #lease_end == 0 then
  return {0, -1, queued}
end
return {0, tonumber(lease_end[2]) - now, queued}
