-- Give back a pass that a later check blocked (warm-up and pacer alike).
-- KEYS[1]  the hash of warmup_lib.lua
-- ARGV[1]  the bucket the pass was counted in
-- ARGV[2]  how many calls to give back
-- returns  1 if the bucket was still kept and was refunded, else 0
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
  return 1
end
return 0
