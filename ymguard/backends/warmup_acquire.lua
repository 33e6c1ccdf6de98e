-- Warm-up (Sentinel's WarmUpController): pass if the last second's passes + n stay within
-- the rate the stored tokens allow (qps / cold_factor when cold, qps when warm).
-- KEYS     see warmup_lib.lua
-- ARGV[1]  count: the rule's qps
-- ARGV[2]  warning tokens: warm_up_seconds * count / (cold_factor - 1)
-- ARGV[3]  max tokens: warning + 2 * warm_up_seconds * count / (1 + cold_factor)
-- ARGV[4]  slope: (cold_factor - 1) / count / (max - warning)
-- ARGV[5]  cold_factor
-- ARGV[6]  n, the calls this attempt wants to pass
-- ARGV[7]  the key's time to live in ms (idle longer than it, the resource is cold anyway)
-- returns  {1, bucket} when passed, {0, ms until the oldest pass leaves the window}
local count, warning, max_tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slope, cold_factor, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens = sync_tokens(count, warning, max_tokens, cold_factor)
local qps = passed(slot - 9, slot)
if qps + n <= warm_rate(tokens, count, warning, slope) then
  count_pass(now, n)
  redis.call('PEXPIRE', KEYS[1], ARGV[7])  -- after the writes: a new key gets its expiry too
  return {1, slot}
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local oldest = slot
for b, c in pairs(buckets) do
  if c > 0 and b >= slot - 9 and b < oldest then oldest = b end
end
return {0, (oldest + 10) * 100 - now}
