-- relay budget timeout: close a pause whose deadline passed, unless it was answered.
--
-- KEYS[1] pending  string
-- KEYS[2] decision list
-- ARGV[1] pause_id
--
-- Returns {"timeout"} when the pause was still pending (now closed), or
-- {"client", decision} when an answer won the race against the deadline.
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur)['pause_id'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {'timeout'}
end
local prefix = ARGV[1] .. ':'
for _, value in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if string.sub(value, 1, #prefix) == prefix then
    redis.call('LREM', KEYS[2], 1, value)
    return {'client', string.sub(value, #prefix + 1)}
  end
end
return {'timeout'}
