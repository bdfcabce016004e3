-- relay budget open: mark a budget pause pending.
--
-- KEYS[1] pending  string  the pause (JSON with pause_id), expires after the deadline
-- KEYS[2] wake     list    wake-ups for waiters; cleared of entries of older pauses
-- ARGV[1] the pause as JSON
-- ARGV[2] time to live in milliseconds
--
-- Returns {1, pause} when opened, {0, existing} when a pause was already pending.
--
-- Refused with "ERR relay: ..." (nothing written) when the pause is not a
-- JSON object with a non-empty string pause_id and a timeout_decision of
-- "continue" or "stop", or the ttl is not a positive integer: every waiter
-- and answer reads those two fields.
local ok, pause = pcall(cjson.decode, ARGV[1])
if not ok or type(pause) ~= 'table' then
  return redis.error_reply('ERR relay: pause (ARGV[1]) is not a JSON object')
end
if type(pause['pause_id']) ~= 'string' or pause['pause_id'] == '' then
  return redis.error_reply('ERR relay: pause has no pause_id string')
end
local default = pause['timeout_decision']
if default ~= 'continue' and default ~= 'stop' then
  return redis.error_reply('ERR relay: pause timeout_decision is not "continue" or "stop"')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[2]) is not a positive integer')
end
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, ARGV[1]}
