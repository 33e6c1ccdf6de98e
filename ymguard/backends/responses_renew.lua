-- Idempotency-Key: the request still runs, so extend its in-flight lease.
-- KEYS[1]  the hash of idempotency_begin.lua
-- ARGV[1]  the holder's lease id
-- ARGV[2]  lease length in ms
-- returns  1 if our lease was extended, 0 if it had expired (or the response is stored)
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
