-- relay lease finish: record that a lost request's terminal events are out.
--
-- KEYS[1] lease  hash  the request's lease (see lease_fence.lua)
-- KEYS[2] state  hash  the request's snapshot state
-- ARGV[1] first seq of the terminal events the gateway published, 0 if none
-- ARGV[2] ttl seconds of the state (applied only when the state had none)
--
-- Marks the claim finished (no takeover any more) and the snapshot's outcome:
-- the outcome the terminal events produced (a root agent's agent_failed), or,
-- when the request had no running root agent, a new one with status
-- "failed". Either gets reason "orchestrator_lost", the orchestrator and
-- lost_ts. An outcome older than the terminal events (the request had
-- already ended) is left as it was. Returns 1, or 0 when the request was not
-- declared lost.
if not string.find(ARGV[1], '^%d+$') then
  return redis.error_reply('ERR relay: first seq (ARGV[1]) is not an integer >= 0')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[2]) is not a positive integer')
end
local info = redis.call('HMGET', KEYS[1], 'lost', 'lost_ts')
if not info[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'finished', now)
local first = tonumber(ARGV[1])
local raw = redis.call('HGET', KEYS[2], 'outcome')
local outcome = nil
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then outcome = decoded end
end
if outcome and not (first > 0 and tonumber(outcome['seq'] or 0) >= first) then
  return 1
end
if not outcome then
  outcome = {status = 'failed', agent_id = cjson.null,
             seq = tonumber(redis.call('HGET', KEYS[2], 'last_seq') or '0'), ts = now}
end
outcome['reason'] = 'orchestrator_lost'
outcome['orchestrator'] = info[1]
outcome['lost_ts'] = tonumber(info[2])
redis.call('HSET', KEYS[2], 'outcome', cjson.encode(outcome))
if redis.call('TTL', KEYS[2]) < 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
