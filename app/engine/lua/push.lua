-- push: accept a batch of events of one shard, all or none (a script runs whole).
-- KEYS: 1 ready index, 2 stats, 3 active set, 4 paused accounts of the shard, then 5 per
--       account of the batch:
--       pending list, lock, seq, dedupe hash of this time bucket and of the one before
-- ARGV: 1 dedupe bucket TTL ms, 2 claim order, 3 random seed (claim order random), 4 backlog
--       cap per account (0: none), then 4 per event: the account's number among the batch's
--       accounts (1 for the first one's keys), account, event_id, body after its opening brace.
-- Returns 2 per event: 1 and its seq when queued, 0 and the earlier seq when the event_id was
-- accepted within the dedupe window (an earlier event of this batch counts), 2 and 0 when the
-- account's pending list already holds `cap` events (refused: nothing of it is stored).
-- An account's seqs only grow: each is the account's last seq + 1, or the server clock in
-- microseconds when that is more (_lib.lua's now_us), so a lost or expired seq key is harmless.
-- Commands go per account, not per event: two HMGETs read every id of the account's events,
-- one HSET, one PEXPIRE, one RPUSH and one SET store what is new.
-- Sent again: every event is answered as a duplicate with its seq; nothing changes.
ready, stats, active, paused = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, order, cap = ARGV[1], ARGV[2], tonumber(ARGV[4])
math.randomseed(tonumber(ARGV[3]))
local now = now_us()
-- `command` on `key` with every value, in calls of at most 1,000 (Lua's unpack has a limit);
-- the last call's reply.
local function in_chunks(command, key, values)
  local reply
  for j = 1, #values, 1000 do
    reply = redis.call(command, key, unpack(values, j, math.min(j + 999, #values)))
  end
  return reply
end
-- The events of each account, in batch order: ARGV positions.
local accounts, events_of = {}, {}
for i = 5, #ARGV, 4 do
  local number = tonumber(ARGV[i])
  local events = events_of[number]
  if events then
    events[#events + 1] = i
  else
    events_of[number] = {i}
    accounts[#accounts + 1] = number
  end
end
local out, accepted, refused = {}, 0, 0
for _, number in ipairs(accounts) do
  local at, events = 5 + 5 * (number - 1), events_of[number]
  local account = ARGV[events[1] + 1]
  local ids = {}
  for n, i in ipairs(events) do ids[n] = ARGV[i + 2] end
  local now_seen, then_seen
  if #ids <= 1000 then
    now_seen = redis.call('HMGET', KEYS[at + 3], unpack(ids))
    then_seen = redis.call('HMGET', KEYS[at + 4], unpack(ids))
  else
    now_seen, then_seen = {}, {}
    for j = 1, #ids, 1000 do
      local part = {unpack(ids, j, math.min(j + 999, #ids))}
      for k, seq in ipairs(redis.call('HMGET', KEYS[at + 3], unpack(part))) do
        now_seen[j + k - 1] = seq
      end
      for k, seq in ipairs(redis.call('HMGET', KEYS[at + 4], unpack(part))) do
        then_seen[j + k - 1] = seq
      end
    end
  end
  local backlog = cap > 0 and redis.call('LLEN', KEYS[at]) or 0
  local last, given, new_ids, bodies = nil, {}, {}, {}
  for n, i in ipairs(events) do
    local id = ids[n]
    local seen = now_seen[n] or then_seen[n] or given[id]
    local slot = (i - 5) / 2  -- this event's two replies: out[slot + 1], out[slot + 2]
    if seen then
      out[slot + 1], out[slot + 2] = 0, tonumber(seen)
    elseif cap > 0 and backlog + #bodies >= cap then
      out[slot + 1], out[slot + 2] = 2, 0
      refused = refused + 1
    else
      last = math.max((last or tonumber(redis.call('GET', KEYS[at + 2])) or 0) + 1, now)
      local text = digits(last)
      given[id] = text
      new_ids[#new_ids + 1], new_ids[#new_ids + 2] = id, text
      bodies[#bodies + 1] = '{"seq":' .. text .. ',' .. ARGV[i + 3]
      out[slot + 1], out[slot + 2] = 1, last
    end
  end
  if #bodies > 0 then
    in_chunks('HSET', KEYS[at + 3], new_ids)
    redis.call('PEXPIRE', KEYS[at + 3], ttl)
    local length = in_chunks('RPUSH', KEYS[at], bodies)
    redis.call('SET', KEYS[at + 2], digits(last))
    accepted = accepted + #bodies
    -- Into the active set if its pending list was empty (else it is a member already), and
    -- ready on its whole new backlog unless an owner holds it or it is paused. _lib.lua's
    -- make_ready reads these locals: point them at this account.
    pending, lock = KEYS[at], KEYS[at + 1]
    if length == #bodies then redis.call('SADD', active, account) end
    if redis.call('EXISTS', lock) == 0 then
      make_ready(account, order, tostring(math.random()), length)
    end
  end
end
if accepted > 0 then redis.call('HINCRBY', stats, 'accepted', accepted) end
if refused > 0 then redis.call('HINCRBY', stats, 'refused', refused) end
return out
