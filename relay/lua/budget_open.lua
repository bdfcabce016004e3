-- relay budget open: mark a budget pause pending.
--
-- KEYS[1] pending  string  the pause (JSON with pause_id), expires after the deadline
-- KEYS[2] wake     list    wake-ups for waiters; cleared of entries of older pauses
-- ARGV[1] the pause as JSON
-- ARGV[2] time to live in milliseconds
--
-- Returns {1, pause} when opened, {0, existing} when a pause was already pending.
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, ARGV[1]}
