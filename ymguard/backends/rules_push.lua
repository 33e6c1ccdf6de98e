-- Store a new version of the pushed rules and tell every process, in one step.
-- KEYS[1]: the rules hash (fields version, text, digest, source, pushed_ms)
-- KEYS[2]: the channel every guard on this key prefix listens to
-- ARGV[1]: the rules (YAML text), ARGV[2]: their digest, ARGV[3]: where they came from,
-- ARGV[4]: the version the pusher expects in force now ('' for whatever is there)
-- Returns {1, new version}, or {0, version in force} when ARGV[4] does not match.
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= current then
  return {0, current}
end
local version = current + 1
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'version', version, 'text', ARGV[1], 'digest', ARGV[2],
  'source', ARGV[3], 'pushed_ms', ms)
redis.call('PUBLISH', KEYS[2], version .. ' ' .. ARGV[2])
return {1, version}
