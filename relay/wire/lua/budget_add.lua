-- relay budget add: the request's shared token budget, one atomic step.
--
-- KEYS[1] budget hash (used, total, warned)
-- KEYS[2] pending  string  the request's open budget pause, if any
-- ARGV[1] tokens to add (>= 0)
-- ARGV[2] total budget (used when the request has none yet)
-- ARGV[3] warning threshold, a fraction in (0, 1)
-- ARGV[4] ttl seconds
--
-- Returns {status, used, total, paused}; status is "ok", "warning" or
-- "exhausted"; paused is 1 while a budget pause is open, so agents on every
-- host learn of it on their next add. Warning fires exactly once, when usage
-- first crosses the threshold; a jump from below the threshold straight to
-- the total yields exhausted and never a warning; exhausted is returned at or
-- above the total, every time.
--
-- Refused with "ERR relay: ..." (nothing written) when an argument is out of
-- its range above.
if not string.find(ARGV[1], '^%d+$') then
  return redis.error_reply('ERR relay: tokens (ARGV[1]) is not an integer >= 0')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: total (ARGV[2]) is not a positive integer')
end
local threshold = tonumber(ARGV[3])
if not threshold or threshold <= 0 or threshold >= 1 then
  return redis.error_reply('ERR relay: threshold (ARGV[3]) is not a fraction in (0, 1)')
end
if not string.find(ARGV[4], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[4]) is not a positive integer')
end
redis.call('HSETNX', KEYS[1], 'total', ARGV[2])
local used = redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local paused = redis.call('EXISTS', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if used >= total then
  redis.call('HSET', KEYS[1], 'warned', 1)
  return {'exhausted', used, total, paused}
end
if used >= total * threshold and redis.call('HSETNX', KEYS[1], 'warned', 1) == 1 then
  return {'warning', used, total, paused}
end
return {'ok', used, total, paused}
