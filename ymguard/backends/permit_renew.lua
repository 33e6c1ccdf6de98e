-- Extend held permits' leases from now (the lease keeper renews many in one call).
-- KEYS     see permit_lib.lua (holders, permits, line, places)
-- ARGV[1]  the new lease length in ms, counted from now
-- ARGV[2]  permits (used while KEYS[2] does not exist)
-- ARGV[3]  the wake-up channel
-- ARGV[4..] permit ids
-- returns  per id, the new expiry in server ms, or 0 if it had expired (it is not revived)
local lease = tonumber(ARGV[1])
local out = {}
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
    out[#out + 1] = now + lease
  else
    out[#out + 1] = 0
  end
end
keep_for(KEYS[1], lease)
if reclaimed > 0 and queued > 0 then
  wake(ARGV[3], permit_count(ARGV[2]) - redis.call('ZCARD', KEYS[1]))
end
return out
