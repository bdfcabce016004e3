-- relay budget close: the outcome of a pause whose waiter stops waiting.
--
-- KEYS[1] pending  string
-- KEYS[2] wake     list
-- KEYS[3] decided  hash
-- ARGV[1] pause_id
-- ARGV[2] the default decision ("continue" or "stop")
-- ARGV[3] ttl seconds of the decided hash
--
-- If the pause was answered, returns {"client", decision} (also when the
-- answer won the race against the deadline). If it is still pending, closes
-- it with the default, records that for the other waiters, and returns
-- {"timeout", default}. A pause that vanished without a decision (its marker
-- expired) also yields {"timeout", default}.
--
-- Refused with "ERR relay: ..." (nothing written) when the default is not
-- "continue" or "stop", the pause_id is empty or the ttl is not a positive
-- integer.
if ARGV[2] ~= 'continue' and ARGV[2] ~= 'stop' then
  return redis.error_reply('ERR relay: default decision "' .. string.sub(ARGV[2], 1, 40)
    .. '" is not "continue" or "stop"')
end
if ARGV[1] == '' then
  return redis.error_reply('ERR relay: pause_id (ARGV[1]) is empty')
end
if not string.find(ARGV[3], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[3]) is not a positive integer')
end
local done = redis.call('HGET', KEYS[3], ARGV[1])
if done then
  local by, decision = string.match(done, '^(%a+):(%a+)$')
  return {by, decision}
end
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur)['pause_id'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[3], ARGV[1], 'timeout:' .. ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return {'timeout', ARGV[2]}
