-- relay publish: assign seq, keep history and state, and publish, atomically.
--
-- KEYS[1] seq      string  INCR counter of the request
-- KEYS[2] epoch    string  id of this incarnation of the request's stream
-- KEYS[3] history  stream  frames of the request, entry id "<seq>-0", field "f"
-- KEYS[4] state    hash    snapshot state (agents, budget, outcome)
-- KEYS[5] lease    hash    optional: the request's lease (relay/wire/lua/lease_*.lua).
--                          An orchestrator that holds leases passes it; when the
--                          request was declared lost (its orchestrator's lease
--                          expired and a gateway finished it) the call is refused
--                          with "ERR relay: orchestrator lost: ...", so an
--                          orchestrator that comes back cannot resurrect it.
--
-- Also written, named from KEYS[1] (same hash tag, so same cluster slot):
--   <base>text:<agent_id>  string  the agent's text so far: every
--   agent_text_delta's "text" appended, cut to its latest TEXT_KEEP bytes
--   whenever it outgrows TEXT_TRIM; state field "t:<agent_id>" counts the
--   bytes cut from its head (see docs/PROTOCOL.md, compact catch-up).
--
-- ARGV[1] request_id (lowercase hyphenated uuid)
-- ARGV[2] epoch candidate: used only when the request has no epoch yet
-- ARGV[3] history max events (stream MAXLEN, exact)
-- ARGV[4] history ttl seconds (refreshed on every publish)
-- ARGV[5] state ttl seconds (seq, epoch and state outlive the history)
-- ARGV[6] request channel
-- ARGV[7] tenant firehose channel (on a cluster: the firehose shard of the request's slot)
-- ARGV[8] publish id: a random id of this call, kept on its last history entry
-- ARGV[9] "0" on a first attempt; on a retry, the retry window in ms: if an
--         entry with this publish id was written within it, nothing is
--         published again and that entry's result is returned
-- ARGV[10], ARGV[11], ...: pairs of (event type, event JSON object)
--
-- Returns {epoch, ts, first_seq, last_seq}: epoch and ts (ms) are bulk
-- strings, the seqs integers.
--
-- Each event JSON must be a compact object without seq/ts keys (and without
-- request_id unless it is a field of the event, then equal to ARGV[1]); the
-- frame is that object with ,"request_id":..,"seq":..,"ts":.. appended.
-- The channel message is a one-line header then the frame:
--   "<epoch> <seq> <request_id> <type> <ts>\n<frame>"
--
-- Input is checked before anything is written: a history entry is served to
-- every client that ever resumes across it, so one malformed frame would
-- break those clients for as long as the history lives. A call with any bad
-- argument or event is refused as a whole with an error reply
-- "ERR relay: ..." naming the problem (and the event, numbered from 1), and
-- leaves no trace. The refusals are listed in docs/PROTOCOL.md.

-- Library functions as locals: a global lookup in a Redis script goes
-- through the protected global table, and the checks below are on the hot
-- path (see benchmarks/publish_script.py).
local find, byte, sub = string.find, string.byte, string.sub
local decode, pcall, type = cjson.decode, pcall, type

-- The publish command. On a Redis Cluster relay loads this source with this
-- one line reading 'SPUBLISH' (relay.wire.scripts.SHARDED_PUBLISH_LINE): a
-- shard channel is delivered by the node that owns its slot only, where
-- PUBLISH would be broadcast to every node of the cluster. ARGV[6] and
-- ARGV[7] must then both hash to this request's slot (the firehose shard,
-- relay.wire.keys.Keys.firehose_shard); the server refuses anything else.
local PUBLISH = 'PUBLISH'

local function refuse(message)
  return redis.error_reply('ERR relay: ' .. message)
end

local function shown(value)
  -- A value for an error message: JSON when it can be encoded, bounded.
  local ok, text = pcall(cjson.encode, value)
  if not ok then text = tostring(value) end
  if #text > 80 then text = sub(text, 1, 77) .. '...' end
  return text
end

-- Sets of event types as words between "|": a plain find in a constant
-- string costs less per call than building a table each time (a script
-- keeps no state between calls). A type is looked up as "|<type>|" and may
-- not contain "|", so only whole words match.
--
-- Every event type of the contract (relay.events.EVENT_TYPES); the type is
-- also a word of the channel header, so nothing else may pass.
local KNOWN = [[
|agent_spawned|agent_text_delta|agent_completed|agent_failed|agent_cancelled|
|budget_update|budget_warning|budget_exhausted|depth_limit_reached|cycle_detected|
|synthesis_started|memory_created|provider_failover|workflow_run_started|
|workflow_step_started|workflow_step_completed|workflow_step_failed|
|workflow_run_completed|workflow_run_failed|workflow_run_paused|budget_decision|
]]
-- Types that update the snapshot state.
local STATEFUL = [[
|agent_spawned|agent_completed|agent_failed|agent_cancelled|depth_limit_reached|
|cycle_detected|budget_update|budget_warning|budget_exhausted|synthesis_started|
|budget_decision|
]]
-- Types whose events belong to one agent (relay.events.AGENT_SCOPED): the
-- state update keys the agent by agent_id, which must therefore be a string.
local AGENT_SCOPED = [[
|agent_spawned|agent_text_delta|agent_completed|agent_failed|agent_cancelled|
|depth_limit_reached|cycle_detected|memory_created|
]]

-- The text kept per agent for snapshots: the latest TEXT_KEEP bytes. The
-- key is cut back only once it exceeds TEXT_TRIM, so a delta costs an APPEND
-- (amortised O(delta)), not a copy of the whole text; the cut itself copies
-- TEXT_KEEP bytes once every TEXT_TRIM - TEXT_KEEP bytes of text. Gateways
-- serve at most snapshot.text_max_bytes (<= TEXT_KEEP) of it.
local TEXT_KEEP = 65536
local TEXT_TRIM = 2 * TEXT_KEEP
local TEXT_REFRESH = 4096

local function is(set, kind)
  return find(set, '|' .. kind .. '|', 1, true) ~= nil
end

-- A lowercase hyphenated UUID (8-4-4-4-12), one literal: built at run time
-- it would cost a concatenation per call.
local UUID =
  '^[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]$'

local rid = ARGV[1]

-- ------------------------------------------------------------ arguments

if #KEYS ~= 4 and #KEYS ~= 5 then
  return refuse('expected 4 keys (seq, epoch, history, state) or 5 (and lease), got ' .. #KEYS)
end
if #ARGV < 11 or (#ARGV - 9) % 2 ~= 0 then
  return refuse('expected 9 arguments then (type, event JSON) pairs, got '
    .. #ARGV .. ' arguments')
end
if not find(rid, UUID) then
  return refuse('request_id ' .. shown(rid) .. ' is not a lowercase hyphenated UUID')
end
-- Keys or a channel of another request (or keys in the wrong order) would
-- put this request's frames where its viewers never read, or others do.
-- Every name is the seq key's with another last word (same tenant).
local base = sub(KEYS[1], 1, -4)
if sub(KEYS[1], -3) ~= 'seq' or not find(base, '{' .. rid .. '}:', -(#rid + 3), true) then
  return refuse('KEYS[1] ' .. shown(KEYS[1]) .. ' is not the seq key of request ' .. rid)
end
if KEYS[2] ~= base .. 'epoch' then
  return refuse('KEYS[2] ' .. shown(KEYS[2]) .. ' is not the epoch key of request ' .. rid)
end
if KEYS[3] ~= base .. 'history' then
  return refuse('KEYS[3] ' .. shown(KEYS[3]) .. ' is not the history key of request ' .. rid)
end
if KEYS[4] ~= base .. 'state' then
  return refuse('KEYS[4] ' .. shown(KEYS[4]) .. ' is not the state key of request ' .. rid)
end
if #KEYS == 5 and KEYS[5] ~= base .. 'lease' then
  return refuse('KEYS[5] ' .. shown(KEYS[5]) .. ' is not the lease key of request ' .. rid)
end
if ARGV[6] ~= base .. 'events' then
  return refuse('ARGV[6] ' .. shown(ARGV[6]) .. ' is not the channel of request ' .. rid)
end
if #ARGV[2] > 64 or not find(ARGV[2], '^[%w_.-]+$') then
  return refuse('epoch candidate ' .. shown(ARGV[2])
    .. ' must be 1-64 letters, digits, "_", "." or "-"')
end
for n = 3, 5 do
  if not find(ARGV[n], '^[1-9]%d*$') then
    return refuse('ARGV[' .. n .. '] ' .. shown(ARGV[n]) .. ' is not a positive integer')
  end
end
if ARGV[8] == '' then
  return refuse('publish id (ARGV[8]) is empty')
end
if not find(ARGV[9], '^%d+$') then
  return refuse('retry window (ARGV[9]) ' .. shown(ARGV[9]) .. ' is not an integer >= 0')
end

-- ------------------------------------------------------------ lease

if #KEYS == 5 then
  local lost = redis.call('HMGET', KEYS[5], 'lost', 'lost_ts')
  if lost[1] then
    return refuse('orchestrator lost: request ' .. rid .. ' was finished by a gateway at '
      .. tostring(lost[2]) .. ' ms because the lease of orchestrator ' .. lost[1]
      .. ' expired; nothing more can be published to it')
  end
end

-- ------------------------------------------------------------ events

-- Every event is decoded once here and the decoded object reused for the
-- state update, so validation costs one cjson.decode per event.
local decoded = {}
local n = 0
for i = 10, #ARGV, 2 do
  n = n + 1
  local kind = ARGV[i]
  local body = ARGV[i + 1]
  if find(kind, '|', 1, true) or not is(KNOWN, kind) then
    return refuse('event ' .. n .. ': unknown event type ' .. shown(kind))
  end
  local ok, ev = pcall(decode, body)
  if not ok then
    return refuse('event ' .. n .. ': is not valid JSON')
  end
  -- cjson decodes arrays to tables too; a JSON text that starts with "[" is one.
  if type(ev) ~= 'table' or find(body, '^%s*%[') then
    return refuse('event ' .. n .. ': is not a JSON object')
  end
  if byte(body, -1) ~= 125 then
    return refuse('event ' .. n .. ': must end with "}" (no trailing whitespace): '
      .. 'the script appends request_id, seq and ts there')
  end
  if ev['type'] ~= kind then
    return refuse('event ' .. n .. ': type argument ' .. shown(kind)
      .. ' does not match the event\'s "type" ' .. shown(ev['type']))
  end
  if ev['seq'] ~= nil or ev['ts'] ~= nil then
    return refuse('event ' .. n .. ': carries "' .. (ev['seq'] ~= nil and 'seq' or 'ts')
      .. '": seq and ts are assigned by the script')
  end
  local own = ev['request_id']
  if own ~= nil and own ~= rid then
    return refuse('event ' .. n .. ': request_id ' .. shown(own)
      .. ' does not match the request "' .. rid .. '"')
  end
  if type(ev['agent_id']) ~= 'string' and is(AGENT_SCOPED, kind) then
    return refuse('event ' .. n .. ': ' .. kind .. ' needs agent_id as a string, got '
      .. shown(ev['agent_id']))
  end
  decoded[n] = ev
end

-- ------------------------------------------------------------ writes

local hist_max = ARGV[3]
local hist_ttl = tonumber(ARGV[4])
local state_ttl = tonumber(ARGV[5])

local t = redis.call('TIME')
local ts = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

local epoch = redis.call('GET', KEYS[2])
if not epoch or redis.call('EXISTS', KEYS[1]) == 0 then
  -- A request with no epoch or no seq is new, or Redis lost part of it
  -- (eviction, a partial restore): start a new incarnation at seq 1, so that
  -- clients holding an old seq are told to resync, and so that INCR can never
  -- fall below the history's newest entry.
  epoch = ARGV[2]
  -- The old incarnation's texts go with its state: the state lists them.
  for _, name in ipairs(redis.call('HKEYS', KEYS[4])) do
    if sub(name, 1, 2) == 't:' then redis.call('DEL', base .. 'text:' .. sub(name, 3)) end
  end
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[2], epoch)
end

-- The state update is chosen by the event type alone, so a stray field
-- (an agent_id on a budget event) cannot update the wrong part of the state.
local function update_state(seq, kind, ev)
  if is(AGENT_SCOPED, kind) then
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
    -- The budget summary is replaced as a whole by the latest budget event:
    -- its fields are that event's (null where it has none, e.g. percentage
    -- after a budget_warning), never a mix of events. warned and exhausted
    -- are facts of the request's history and stay true once seen.
    local prev = redis.call('HGET', KEYS[4], 'budget')
    local was = prev and cjson.decode(prev) or {}
    local function field(name)
      local value = ev[name]
      if value == nil then return cjson.null end
      return value
    end
    redis.call('HSET', KEYS[4], 'budget', cjson.encode({
      tokens_used = field('tokens_used'),
      budget_total = field('budget_total'),
      percentage = field('percentage'),
      completed_agents = field('completed_agents'),
      incomplete_agents = field('incomplete_agents'),
      warned = was['warned'] == true or kind == 'budget_warning',
      exhausted = was['exhausted'] == true or kind == 'budget_exhausted',
      seq = seq,
    }))
  end
end

local count = n
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

-- The text of this call's deltas, per agent, appended once per agent at the
-- end: a batch of deltas then costs one APPEND per agent, not one per delta.
-- Nothing reads the texts inside the call, so the order of agents is free.
local texts = nil

local function collect_text(ev)
  local piece = ev['text']
  if type(piece) ~= 'string' or piece == '' then return end
  local agent = ev['agent_id']
  if texts == nil then texts = {} end
  local pieces = texts[agent]
  if pieces == nil then texts[agent] = {piece} else pieces[#pieces + 1] = piece end
end

local function append_texts()
  for agent, pieces in pairs(texts) do
    local piece = #pieces == 1 and pieces[1] or table.concat(pieces)
    local key = base .. 'text:' .. agent
    local len = redis.call('APPEND', key, piece)
    local refresh = len == #piece
    if refresh then
      -- A new text: register it in the state (which is how snapshots find
      -- it), with nothing cut from its head yet.
      redis.call('HSET', KEYS[4], 't:' .. agent, 0)
    end
    if len > TEXT_TRIM then
      redis.call('SET', key, redis.call('GETRANGE', key, -TEXT_KEEP, -1))
      redis.call('HINCRBY', KEYS[4], 't:' .. agent, len - TEXT_KEEP)
    end
    -- The history's TTL: a text digests the history's deltas, and costs
    -- memory as long as they do. Refreshed when the text starts, is cut, or
    -- crosses a multiple of TEXT_REFRESH bytes, not on every delta (an
    -- EXPIRE per call would be a tenth of a one-delta publish): it may thus
    -- expire as much earlier than the history as the agent took to stream
    -- TEXT_REFRESH bytes. A cut (whose SET drops the TTL) always crosses
    -- one, TEXT_TRIM being a multiple of TEXT_REFRESH.
    if refresh or math.floor((len - #piece) / TEXT_REFRESH) ~= math.floor(len / TEXT_REFRESH) then
      redis.call('EXPIRE', key, hist_ttl)
    end
  end
end

local first_seq = nil
local seq = 0
n = 0
for i = 10, #ARGV, 2 do
  local kind = ARGV[i]
  local body = ARGV[i + 1]
  n = n + 1
  local ev = decoded[n]
  seq = redis.call('INCR', KEYS[1])
  if not first_seq then first_seq = seq end
  -- Budget and synthesis events carry request_id as a field of their own
  -- (checked above to be this request's): keep that one rather than writing
  -- the key twice.
  local tail = ',"seq":' .. seq .. ',"ts":' .. ts .. '}'
  if ev['request_id'] == nil then
    tail = ',"request_id":"' .. rid .. '"' .. tail
  end
  local frame = sub(body, 1, -2) .. tail
  if i + 1 == #ARGV then
    redis.call('XADD', KEYS[3], 'MAXLEN', hist_max, seq .. '-0', 'f', frame, 'p', ARGV[8])
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', hist_max, seq .. '-0', 'f', frame)
  end
  if kind == 'agent_text_delta' then
    collect_text(ev)
  elseif is(STATEFUL, kind) then
    update_state(seq, kind, ev)
  end
  local msg = epoch .. ' ' .. seq .. ' ' .. rid .. ' ' .. kind .. ' ' .. ts .. '\n' .. frame
  redis.call(PUBLISH, ARGV[6], msg)
  redis.call(PUBLISH, ARGV[7], msg)
end

redis.call('HSET', KEYS[4], 'last_seq', seq, 'epoch', epoch, 'last_ts', ts)
redis.call('EXPIRE', KEYS[1], state_ttl)
redis.call('EXPIRE', KEYS[2], state_ttl)
redis.call('EXPIRE', KEYS[3], hist_ttl)
redis.call('EXPIRE', KEYS[4], state_ttl)
if texts ~= nil then append_texts() end
return {epoch, ts, first_seq, seq}
