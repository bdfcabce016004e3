-- relay lease request: an orchestrator takes or gives back a request.
--
-- KEYS[1] lease  hash  the request's lease: o:<orchestrator id> -> "held" or
--                      "lost"; once declared lost also lost (the orchestrator
--                      whose lease expired), lost_ts (ms), claim_ts, reaper,
--                      finished (ms)
-- ARGV[1] "hold" or "release"
-- ARGV[2] orchestrator id
-- ARGV[3] ttl seconds of the lease hash (the request state's)
--
-- hold: refused with "ERR relay: orchestrator lost: ..." when the request was
-- declared lost (it was finished for every viewer and stays finished);
-- otherwise marks the orchestrator as a holder and returns 1.
-- release: removes the orchestrator's mark if it still holds the request;
-- returns 1 if it did, 0 if the request was not held by it (or was declared
-- lost meanwhile: the marks of a lost request are kept).
if ARGV[1] ~= 'hold' and ARGV[1] ~= 'release' then
  return redis.error_reply('ERR relay: op (ARGV[1]) is not "hold" or "release"')
end
if not string.find(ARGV[2], '^[%w_.-]+$') or #ARGV[2] > 64 then
  return redis.error_reply('ERR relay: orchestrator id (ARGV[2]) must be 1-64 letters, digits, "_", "." or "-"')
end
if not string.find(ARGV[3], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[3]) is not a positive integer')
end
local field = 'o:' .. ARGV[2]
if ARGV[1] == 'hold' then
  local lost = redis.call('HMGET', KEYS[1], 'lost', 'lost_ts')
  if lost[1] then
    return redis.error_reply('ERR relay: orchestrator lost: the request was finished by a gateway at '
      .. tostring(lost[2]) .. ' ms because the lease of orchestrator ' .. lost[1]
      .. ' expired; it cannot be held again')
  end
  redis.call('HSET', KEYS[1], field, 'held')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
if redis.call('HGET', KEYS[1], field) == 'held' then
  redis.call('HDEL', KEYS[1], field)
  return 1
end
return 0
