-- relay lease due: declare lost every orchestrator whose lease expired.
--
-- KEYS[1] leases  zset  orchestrator id -> lease deadline (ms, Redis clock)
-- KEYS[2] lost    zset  orchestrator id -> when it was declared lost (ms)
-- ARGV[1] most orchestrators to return (a positive integer)
-- ARGV[2] how long (ms) a declaration of loss is kept (renewals stay refused)
--
-- Returns {now_ms, id1, new1, id2, new2, ...}: each orchestrator whose
-- deadline passed (Redis clock), with new = 1 when this call declared it lost
-- and 0 when an earlier call did (its requests may still be being finished).
-- An orchestrator stays in KEYS[1] until a gateway has finished all of its
-- requests and removed it, so a gateway that stops half way is replaced by
-- the next one that calls this.
--
-- Atomic with lease_renew.lua (same slot): an orchestrator that renewed in
-- time is never returned.
if not string.find(ARGV[1], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: count (ARGV[1]) is not a positive integer')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: keep (ARGV[2]) is not a positive integer')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  local new = 0
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], now, id)
    new = 1
  end
  out[#out + 1] = id
  out[#out + 1] = new
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
return out
