-- Idempotency-Key, last step: store the finished response and drop the lease, in one go.
-- KEYS[1]  the hash of idempotency_begin.lua
-- ARGV[1]  the holder's lease id
-- ARGV[2]  fingerprint   ARGV[3] status   ARGV[4] headers (JSON)   ARGV[5] body
-- ARGV[6]  kept: '1' if the body was kept, '0' if it was too large or not storable
-- ARGV[7]  ttl of the stored response in ms
-- returns  1 if stored; 0 if another holder took the key after our lease expired
local lease = redis.call('HGET', KEYS[1], 'lease')
if lease ~= ARGV[1] and (lease or redis.call('EXISTS', KEYS[1]) == 1) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'status', ARGV[3], 'headers', ARGV[4],
  'body', ARGV[5], 'kept', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
