-- relay lease fence: a gateway claims a request whose orchestrator was declared lost.
--
-- KEYS[1] lease    hash    the request's lease (see lease_request.lua)
-- KEYS[2] state    hash    the request's snapshot state (see publish.lua)
-- KEYS[3] pending  string  the request's open budget pause, if any
-- ARGV[1] id of the orchestrator declared lost (by lease_due.lua)
-- ARGV[2] takeover ms: a claim not finished for this long may be taken over
-- ARGV[3] id of the claiming gateway (kept for operators)
--
-- Exactly one caller wins a request: the first call marks the request lost
-- (from then on the publish script, given the lease key, refuses the
-- orchestrators' publishes) and returns
--   {1, 0, lost orchestrator id, lost_ts, pending pause JSON or "", agent JSON...}
-- with the agents of the snapshot that are still running or retrying, for
-- the winner to publish their terminal events. A later call returns {0} when
-- there is nothing left to do (the orchestrator no longer holds the request,
-- or the request was finished: lease_finish.lua) and {2} while another
-- gateway's claim is in progress; a claim that stayed unfinished for the
-- takeover time is presumed dead, and the call wins again with {1, 1, ...}:
-- the winner then publishes with the same publish id, so the publish script
-- never writes the terminal events twice.
if ARGV[1] == '' then
  return redis.error_reply('ERR relay: orchestrator id (ARGV[1]) is empty')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: takeover (ARGV[2]) is not a positive integer')
end
local field = 'o:' .. ARGV[1]
local mine = redis.call('HGET', KEYS[1], field)
if mine ~= 'held' and mine ~= 'lost' then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local info = redis.call('HMGET', KEYS[1], 'lost', 'lost_ts', 'finished', 'claim_ts')
local retry = 0
if info[1] then
  -- Already declared lost, through this holder or another one.
  redis.call('HSET', KEYS[1], field, 'lost')
  if info[3] then
    return {0}
  end
  if now - tonumber(info[4] or now) < tonumber(ARGV[2]) then
    return {2}
  end
  redis.call('HSET', KEYS[1], 'claim_ts', now, 'reaper', ARGV[3])
  retry = 1
else
  redis.call('HSET', KEYS[1], field, 'lost', 'lost', ARGV[1], 'lost_ts', now,
    'claim_ts', now, 'reaper', ARGV[3])
  info = {ARGV[1], now}
end
local out = {1, retry, info[1], tonumber(info[2]), redis.call('GET', KEYS[3]) or ''}
local state = redis.call('HGETALL', KEYS[2])
for i = 1, #state, 2 do
  if string.sub(state[i], 1, 2) == 'a:' then
    local ok, agent = pcall(cjson.decode, state[i + 1])
    if ok and type(agent) == 'table'
        and (agent['status'] == 'running' or agent['status'] == 'retrying') then
      out[#out + 1] = state[i + 1]
    end
  end
end
return out
