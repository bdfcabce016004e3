-- relay budget answer: first decision wins, atomically.
--
-- KEYS[1] pending  string  the pause (JSON with pause_id)
-- KEYS[2] decision list    the orchestrator blocks on it (BLPOP)
-- ARGV[1] "continue" or "stop"
-- ARGV[2] ttl seconds of the decision list (if its orchestrator is gone)
--
-- Returns the pause JSON it answered, or false when no pause is pending
-- (never answered, already answered, or timed out): such an answer is
-- refused and can never reach a later pause.
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local pause = cjson.decode(cur)
redis.call('DEL', KEYS[1])
redis.call('RPUSH', KEYS[2], pause['pause_id'] .. ':' .. ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return cur
