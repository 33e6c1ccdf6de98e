-- Read a breaker's state, with its timers relative to the server clock (a process
-- refreshes its local copy with it after (re)subscribing to the transitions).
-- KEYS[1]  hash of the breaker (fields in breaker_lib.lua)
-- returns  {0, state, version (0: no hash, i.e. closed), ms until the probe,
--           ms until the probe lease ends}
-- (t, now, h, s, v, p, l come from breaker_lib.lua)
return {0, s, v, p - now, l - now}
