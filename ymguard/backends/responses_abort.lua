-- Idempotency-Key: the first request failed, so free the key for a retry.
-- KEYS[1]  the hash of idempotency_begin.lua
-- ARGV[1]  the holder's lease id
-- returns  1 if our lease was dropped, 0 if it had expired or another holder has the key
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
