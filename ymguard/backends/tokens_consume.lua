-- Submit token: compare-and-delete, so of any number of concurrent consumes one wins.
-- KEYS[1]  string: the token issued for one scope
-- ARGV[1]  the token the client presented
-- returns  1 if it was the live token (now deleted), else 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
