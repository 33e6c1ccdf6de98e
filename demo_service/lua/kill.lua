-- One seckill attempt, atomically: window on Redis time, per-user cap, stock, then
-- decrement, record the buyer and the kill order, and append the pre-order to the stream.
-- KEYS[1] stock   KEYS[2] buyers (hash user_id -> count)   KEYS[3] meta (hash)
-- KEYS[4] pending (hash kill_order_no -> user_id)          KEYS[5] the pre-order stream
-- ARGV[1] user_id   ARGV[2] kill_order_no   ARGV[3] kill_course_id
-- Returns {code, stock_left}: 1 admitted, 0 sold out, -1 limit reached,
-- -2 not started, -3 ended, -4 not published (no such kill course in Redis).
local meta = redis.call('HMGET', KEYS[3], 'start_ms', 'end_ms', 'limit')
if not meta[1] then
  return {-4, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(meta[1]) then
  return {-2, 0}
end
if now >= tonumber(meta[2]) then
  return {-3, 0}
end
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
local bought = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if bought >= tonumber(meta[3]) then
  return {-1, stock}
end
if stock <= 0 then
  return {0, 0}
end
redis.call('DECR', KEYS[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'kill_order_no', ARGV[2], 'user_id', ARGV[1],
  'kill_course_id', ARGV[3], 'ts', tostring(now))
return {1, stock - 1}
