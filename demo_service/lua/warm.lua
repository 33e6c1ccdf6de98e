-- Warm one kill course at publish: its stock (only if absent, so a second publish attempt
-- never resets what was sold) and its meta (window in epoch ms, per-user limit, offer).
-- KEYS[1] stock   KEYS[2] meta
-- ARGV[1] kill_count   ARGV[2] start_ms   ARGV[3] end_ms   ARGV[4] kill_limit
-- ARGV[5] activity_id
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('HSET', KEYS[2], 'start_ms', ARGV[2], 'end_ms', ARGV[3], 'limit', ARGV[4],
  'count', ARGV[1], 'activity_id', ARGV[5])
return 1
