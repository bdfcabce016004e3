-- relay budget answer: first decision wins, atomically.
--
-- KEYS[1] pending  string  the pause (JSON with pause_id)
-- KEYS[2] wake     list    waiters block on it (BLPOP); one entry per answer
-- KEYS[3] decided  hash    pause_id -> "client:<decision>" or "timeout:<decision>"
-- ARGV[1] "continue" or "stop"
-- ARGV[2] ttl seconds of the wake list and the decided hash
-- ARGV[3] pause_id the client answers, or "" for whichever pause is pending
--
-- Returns the pause JSON it answered, or false when no pause is pending
-- (never opened, already answered, timed out) or the pending pause is not
-- the one named: such an answer is refused and can never reach a later pause.
-- The decision is recorded in the hash, not only pushed, so every waiter of
-- the pause (several agents, several hosts) reads the same answer.
--
-- Refused with "ERR relay: ..." (nothing written) when the decision is not
-- "continue" or "stop" or the ttl is not a positive integer.
if ARGV[1] ~= 'continue' and ARGV[1] ~= 'stop' then
  return redis.error_reply('ERR relay: decision "' .. string.sub(ARGV[1], 1, 40)
    .. '" is not "continue" or "stop"')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[2]) is not a positive integer')
end
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local pause = cjson.decode(cur)
if ARGV[3] ~= '' and ARGV[3] ~= pause['pause_id'] then return false end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[3], pause['pause_id'], 'client:' .. ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('RPUSH', KEYS[2], pause['pause_id'])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return cur
