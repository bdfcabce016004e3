-- relay lease renew: extend an orchestrator's lease, unless it was declared lost.
--
-- KEYS[1] leases  zset  orchestrator id -> lease deadline (ms, Redis clock)
-- KEYS[2] lost    zset  orchestrator id -> when it was declared lost (ms)
-- ARGV[1] orchestrator id (1-64 letters, digits, "_", "." or "-")
-- ARGV[2] lease ttl in milliseconds
--
-- Returns {now_ms, deadline_ms} (Redis clock). One call renews the lease of
-- every request the orchestrator holds: requests point at the orchestrator,
-- the deadline lives here only.
--
-- Runs in the same slot as lease_due.lua (both keys share the tag {T}), so a
-- renewal and a declaration of loss never interleave: a renewal that lands
-- before the deadline keeps the orchestrator alive, one after a gateway
-- declared it lost is refused with "ERR relay: orchestrator lost: ..." and
-- writes nothing.
if not string.find(ARGV[1], '^[%w_.-]+$') or #ARGV[1] > 64 then
  return redis.error_reply('ERR relay: orchestrator id (ARGV[1]) must be 1-64 letters, digits, "_", "." or "-"')
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR relay: ttl (ARGV[2]) is not a positive integer')
end
local lost = redis.call('ZSCORE', KEYS[2], ARGV[1])
if lost then
  return redis.error_reply('ERR relay: orchestrator lost: orchestrator ' .. ARGV[1]
    .. ' was declared lost at ' .. string.format('%.0f', tonumber(lost))
    .. ' ms (its lease expired); its requests were finished by a gateway')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return {now, deadline}
