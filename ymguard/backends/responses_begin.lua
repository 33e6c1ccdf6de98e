-- Idempotency-Key, first step: look the key up and, if it is new, take the in-flight lease.
-- KEYS[1]  hash: fp = request fingerprint; while in flight: lease = holder id (the key
--          expires with the lease); once done: status, headers, body, kept ('1' | '0')
-- ARGV[1]  the request's fingerprint
-- ARGV[2]  the new holder's lease id
-- ARGV[3]  lease length in ms
-- returns  {0} new (lease taken) | {1} fingerprint mismatch | {2, ms left on the lease}
--          | {3, status, headers, body, kept} done
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'lease', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0}
end
if fp ~= ARGV[1] then
  return {1}
end
if redis.call('HEXISTS', KEYS[1], 'lease') == 1 then
  return {2, redis.call('PTTL', KEYS[1])}
end
local done = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body', 'kept')
return {3, tonumber(done[1]), done[2], done[3], done[4]}
