-- relay snapshot read: a request's state and each agent's text so far, as of
-- one seq, in one atomic read (gateways only; it writes nothing).
--
-- KEYS[1] state    hash    snapshot state; fields "t:<agent_id>" name the
--                          agents with text and count the bytes cut from it
-- KEYS[2] pending  string  the pending budget pause, if any
-- KEYS[3] seq      string  last seq of the request
-- KEYS[4] epoch    string  epoch of the request
--
-- ARGV[1] text bytes per agent to return (0: no text)
--
-- Returns {state (HGETALL, flat), pending or false, seq or false, epoch or
-- false, texts} where texts is flat: agent_id, total bytes the agent's deltas
-- carried so far, then its latest ARGV[1] bytes (which may begin inside a
-- UTF-8 character: the caller cuts at a character boundary).
--
-- One script rather than a MULTI: which text keys to read is only known
-- from the state, and the texts must be exactly those of the seq returned,
-- or a client that follows live events after it would show text twice. The
-- text keys are <state key without "state">text:<agent_id>, in the request's
-- hash tag, so the script stays in one cluster slot.

local sub = string.sub

if #KEYS ~= 4 or sub(KEYS[1], -5) ~= 'state' then
  return redis.error_reply('ERR relay: expected KEYS state, pending, seq, epoch')
end
local limit = tonumber(ARGV[1])
if limit == nil or limit < 0 or limit % 1 ~= 0 then
  return redis.error_reply('ERR relay: ARGV[1] must be an integer >= 0')
end

local base = sub(KEYS[1], 1, -6) .. 'text:'
local state = redis.call('HGETALL', KEYS[1])
local texts = {}
if limit > 0 then
  for i = 1, #state, 2 do
    local name = state[i]
    if sub(name, 1, 2) == 't:' then
      local agent = sub(name, 3)
      local key = base .. agent
      local len = redis.call('STRLEN', key)
      if len > 0 then
        texts[#texts + 1] = agent
        texts[#texts + 1] = (tonumber(state[i + 1]) or 0) + len
        texts[#texts + 1] = redis.call('GETRANGE', key, -limit, -1)
      end
    end
  end
end
return {state, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3]),
        redis.call('GET', KEYS[4]), texts}
