-- Pacing (Sentinel's RateLimiterController, with warm-up its WarmUpRateLimiterController):
-- calls pass cost = round(n * 1000 / rate) ms apart; a call whose slot is more than
-- max_queue_ms away is refused. The slot is reserved here on server time and the wait comes
-- back with it: the caller sleeps, so the spacing holds across processes.
-- KEYS     see warmup_lib.lua
-- ARGV[1]  count: the rule's qps
-- ARGV[2]  max_queue_ms
-- ARGV[3]  n
-- ARGV[4]  the key's time to live in ms
-- ARGV[5]  warning tokens, or -1 without warm-up (then ARGV[6..8] are unused)
-- ARGV[6]  max tokens
-- ARGV[7]  slope
-- ARGV[8]  cold_factor
-- returns  {1, wait ms, slot (server ms), cost ms} when a slot is reserved, or
--          {0, ms until the queue could take this call}
local count, max_queue, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local warning = tonumber(ARGV[5])
local rate = count
if warning >= 0 then
  local tokens = sync_tokens(count, warning, tonumber(ARGV[6]), tonumber(ARGV[8]))
  rate = warm_rate(tokens, count, warning, tonumber(ARGV[7]))
end
local cost = math.floor(n * 1000 / rate + 0.5)
-- A slot freed by a waiter that left goes first: the spacing around it already holds.
if #holes > 0 then
  table.sort(holes)
  local at = holes[1]
  redis.call('HDEL', KEYS[1], 'h' .. string.format('%d', at))
  if warning >= 0 then count_pass(at, n) end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, at - now, at, cost}
end
local latest = state['l'] or 0
local at = latest + cost
if at <= now then
  at = now
elseif at - now > max_queue then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- (a no-op when nothing is kept)
  return {0, at - now - max_queue}
end
redis.call('HSET', KEYS[1], 'l', string.format('%d', at))
if warning >= 0 then count_pass(at, n) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- after the writes: a new key gets its expiry too
return {1, at - now, at, cost}
