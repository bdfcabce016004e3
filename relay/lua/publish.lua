-- relay publish: assign seq, keep history and state, and publish, atomically.
--
-- KEYS[1] seq      string  INCR counter of the request
-- KEYS[2] epoch    string  id of this incarnation of the request's stream
-- KEYS[3] history  stream  frames of the request, entry id "<seq>-0", field "f"
-- KEYS[4] state    hash    snapshot state (agents, budget, outcome)
--
-- ARGV[1] request_id (lowercase hyphenated uuid)
-- ARGV[2] epoch candidate: used only when the request has no epoch yet
-- ARGV[3] history max events (stream MAXLEN, exact)
-- ARGV[4] history ttl seconds (refreshed on every publish)
-- ARGV[5] state ttl seconds (seq, epoch and state outlive the history)
-- ARGV[6] request channel
-- ARGV[7] tenant firehose channel
-- ARGV[8] publish id: a random id of this call, kept on its last history entry
-- ARGV[9] "0" on a first attempt; on a retry, the retry window in ms: if an
--         entry with this publish id was written within it, nothing is
--         published again and that entry's result is returned
-- ARGV[10], ARGV[11], ...: pairs of (event type, event JSON object)
--
-- Returns {epoch, ts, first_seq, last_seq}.
--
-- Each event JSON must be a compact object without seq/ts keys (and without
-- request_id unless it is a field of the event, then equal to ARGV[1]); the
-- frame is that object with ,"request_id":..,"seq":..,"ts":.. appended.
-- The channel message is a one-line header then the frame:
--   "<epoch> <seq> <request_id> <type> <ts>\n<frame>"

local rid = ARGV[1]
local hist_max = ARGV[3]
local hist_ttl = tonumber(ARGV[4])
local state_ttl = tonumber(ARGV[5])

local epoch = redis.call('GET', KEYS[2])
if not epoch or redis.call('EXISTS', KEYS[1]) == 0 then
  -- A request with no epoch or no seq is new, or Redis lost part of it
  -- (eviction, a partial restore): start a new incarnation at seq 1, so that
  -- clients holding an old seq are told to resync, and so that INCR can never
  -- fall below the history's newest entry.
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[2], epoch)
end

local t = redis.call('TIME')
local ts = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

local STATEFUL = {
  agent_spawned = true, agent_completed = true, agent_failed = true,
  agent_cancelled = true, budget_update = true, budget_warning = true,
  budget_exhausted = true, synthesis_started = true, budget_decision = true,
  depth_limit_reached = true, cycle_detected = true,
}

local function update_state(seq, kind, body)
  local ev = cjson.decode(body)
  if ev['agent_id'] then
    local field = 'a:' .. ev['agent_id']
    local cur = redis.call('HGET', KEYS[4], field)
    local agent
    if cur then agent = cjson.decode(cur) else
      agent = {agent_id = ev['agent_id'], parent_id = cjson.null, status = 'running',
               tokens_used = 0, task_description = '', depth = 0, spawned_seq = seq}
    end
    if kind == 'agent_spawned' then
      agent['parent_id'] = ev['parent_id']
      agent['task_description'] = ev['task_description']
      agent['depth'] = ev['depth']
      agent['index'] = ev['index']
      agent['total'] = ev['total']
      agent['spawned_seq'] = seq
    elseif kind == 'agent_completed' then
      agent['status'] = 'completed'
      agent['tokens_used'] = ev['tokens_used']
      agent['duration_ms'] = ev['duration_ms']
      agent['result_summary'] = ev['result_summary']
    elseif kind == 'agent_failed' then
      if ev['will_retry'] then agent['status'] = 'retrying' else agent['status'] = 'failed' end
      agent['error'] = ev['error']
    elseif kind == 'agent_cancelled' then
      agent['status'] = 'cancelled'
      agent['reason'] = ev['reason']
    elseif kind == 'depth_limit_reached' then
      agent['depth_limit'] = ev['max_depth']
    elseif kind == 'cycle_detected' then
      agent['cycle'] = ev['cycle_description']
    end
    agent['updated_seq'] = seq
    redis.call('HSET', KEYS[4], field, cjson.encode(agent))
    -- A root agent's terminal event is the request's outcome.
    local status = agent['status']
    if agent['parent_id'] == cjson.null and (status == 'completed' or status == 'failed'
        or status == 'cancelled') then
      redis.call('HSET', KEYS[4], 'outcome', cjson.encode(
        {status = status, agent_id = ev['agent_id'], seq = seq, ts = tonumber(ts)}))
    end
  elseif kind == 'budget_decision' then
    redis.call('HSET', KEYS[4], 'last_decision', cjson.encode(
      {decision = ev['decision'], decided_by = ev['decided_by'], seq = seq}))
  elseif kind == 'synthesis_started' then
    redis.call('HSET', KEYS[4], 'synthesis_seq', seq)
  else
    local prev = redis.call('HGET', KEYS[4], 'budget')
    local budget = prev and cjson.decode(prev) or {warned = false, exhausted = false}
    budget['tokens_used'] = ev['tokens_used']
    budget['budget_total'] = ev['budget_total']
    if ev['percentage'] then budget['percentage'] = ev['percentage'] end
    if kind == 'budget_warning' then budget['warned'] = true end
    if kind == 'budget_exhausted' then
      budget['exhausted'] = true
      budget['completed_agents'] = ev['completed_agents']
      budget['incomplete_agents'] = ev['incomplete_agents']
    end
    redis.call('HSET', KEYS[4], 'budget', cjson.encode(budget))
  end
end

local count = (#ARGV - 9) / 2
if ARGV[9] ~= '0' then
  -- A retry after an ambiguous failure (connection lost after sending): make
  -- the publish idempotent by looking for our id among the entries written
  -- within the retry window (Redis clock), however many other publishers
  -- wrote meanwhile. Entries are newest first; stop at the first older one.
  local cutoff = tonumber(ts) - tonumber(ARGV[9])
  local upper = '+'
  while true do
    local recent = redis.call('XREVRANGE', KEYS[3], upper, '-', 'COUNT', 256)
    local older = false
    for _, entry in ipairs(recent) do
      local fields = entry[2]
      local entry_ts = nil
      for j = 1, #fields, 2 do
        if fields[j] == 'f' then
          entry_ts = string.match(fields[j + 1], '"ts":(%d+)}$')
        elseif fields[j] == 'p' and fields[j + 1] == ARGV[8] then
          local last = tonumber(string.match(entry[1], '^(%d+)'))
          return {epoch, entry_ts or ts, last - count + 1, last}
        end
      end
      if entry_ts and tonumber(entry_ts) < cutoff then older = true end
    end
    if older or #recent < 256 then break end
    upper = '(' .. recent[#recent][1]
  end
end

local first_seq = nil
local seq = 0
for i = 10, #ARGV, 2 do
  local kind = ARGV[i]
  local body = ARGV[i + 1]
  seq = redis.call('INCR', KEYS[1])
  if not first_seq then first_seq = seq end
  -- Budget and synthesis events carry request_id as a field of their own:
  -- keep that one rather than writing the key twice.
  local tail = ',"seq":' .. seq .. ',"ts":' .. ts .. '}'
  if not string.find(body, '"request_id":"' .. rid .. '"', 1, true) then
    tail = ',"request_id":"' .. rid .. '"' .. tail
  end
  local frame = string.sub(body, 1, -2) .. tail
  if i + 1 == #ARGV then
    redis.call('XADD', KEYS[3], 'MAXLEN', hist_max, seq .. '-0', 'f', frame, 'p', ARGV[8])
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', hist_max, seq .. '-0', 'f', frame)
  end
  if STATEFUL[kind] then update_state(seq, kind, body) end
  local msg = epoch .. ' ' .. seq .. ' ' .. rid .. ' ' .. kind .. ' ' .. ts .. '\n' .. frame
  redis.call('PUBLISH', ARGV[6], msg)
  redis.call('PUBLISH', ARGV[7], msg)
end

redis.call('HSET', KEYS[4], 'last_seq', seq, 'epoch', epoch, 'last_ts', ts)
redis.call('EXPIRE', KEYS[1], state_ttl)
redis.call('EXPIRE', KEYS[2], state_ttl)
redis.call('EXPIRE', KEYS[3], hist_ttl)
redis.call('EXPIRE', KEYS[4], state_ttl)
return {epoch, ts, first_seq, seq}
