-- relay epoch bump: start a new incarnation of a request's stream in place.
--
-- A gateway calls this when Redis came back with an older copy of the request
-- (seq went backwards, or an entry it forwarded was rewritten) while the epoch
-- key survived: without a new epoch, reused seqs would look like duplicates
-- and vanish silently. Compare-and-set, so concurrent gateways agree on one.
--
-- KEYS[1] epoch
-- ARGV[1] the epoch the caller saw
-- ARGV[2] the new epoch
--
-- Returns the epoch now in force.
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return ARGV[2]
end
return cur
