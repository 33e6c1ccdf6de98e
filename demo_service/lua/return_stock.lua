-- Give one unit of stock back and lower the buyer's count, then tell every process.
-- KEYS[1] stock   KEYS[2] buyers   KEYS[3] meta
-- ARGV[1] user_id   ARGV[2] the "stock returned" channel   ARGV[3] kill_course_id
-- Returns 1 when stock came back, 0 when the buyer holds nothing here (a second return of
-- the same purchase: refused, so stock never exceeds what was sold), -4 when not published.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return -4
end
local bought = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if bought <= 0 then
  return 0
end
if bought == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
end
local stock = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
