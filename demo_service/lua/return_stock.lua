-- Give the unit of one kill order back, once: lower the buyer's count, raise the stock,
-- then tell every process. Idempotent per kill order: its number goes into the course's
-- "returned" hash first, and a number already there returns nothing (a redelivered
-- stock.return message, a sweep racing the delayed message).
-- KEYS[1] stock   KEYS[2] buyers   KEYS[3] meta   KEYS[4] returned (hash kill_order_no -> 1)
-- ARGV[1] user_id   ARGV[2] the "stock returned" channel   ARGV[3] kill_course_id
-- ARGV[4] kill_order_no
-- Returns 1 when stock came back, 2 when this kill order's unit came back before, 0 when
-- the buyer holds nothing here (refused, so stock never exceeds what was sold), -4 when
-- the kill course is not published.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return -4
end
if redis.call('HSETNX', KEYS[4], ARGV[4], 1) == 0 then
  return 2
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
redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
