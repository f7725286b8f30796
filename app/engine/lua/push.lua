-- push: accept a batch of events of one shard, all or none (a script runs whole).
-- KEYS: 1 ready index, 2 stats, 3 active set, 4 paused accounts of the shard, 5 and 6 the
--       shard's event ids of this time bucket and of the one before (hash '<account>:<id>' ->
--       seq), then per account of the batch: pending list, lock, seq, and with ARGV 5 = '1'
--       also its ids hashes of the layout before the shard's (this bucket, the one before)
-- ARGV: 1 ids bucket TTL ms, 2 claim order, 3 random seed (claim order random), 4 backlog
--       cap per account (0: none), 5 '1' while ids of the per-account layout may still be
--       alive, else '0', then 4 per event: the account's number among the batch's accounts
--       (1 for the first one's keys), account, event_id, body after its opening brace.
-- Returns 2 per event: 1 and its seq when queued, 0 and the earlier seq when the event_id was
-- accepted within the dedupe window (an earlier event of this batch counts), 2 and 0 when the
-- account's pending list already holds `cap` events (refused: nothing of it is stored).
-- An account's seqs only grow: each is the account's last seq + 1, or the server clock in
-- microseconds when that is more (_lib.lua's now_us), so a lost or expired seq key is harmless.
-- Commands go per call, not per event or account, except one RPUSH per account: the ids are
-- read with two HMGETs and written with one HSET, the seqs read with one MGET and written with
-- one MSET, the locks and the paused flags read once, the ready entries written with one ZADD.
-- Sent again: every event is answered as a duplicate with its seq; nothing changes.
local ready, stats, active, paused = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ids_now, ids_before = KEYS[5], KEYS[6]
local ttl, order, cap, legacy = ARGV[1], ARGV[2], tonumber(ARGV[4]), ARGV[5] == '1'
local per_account = legacy and 5 or 3
math.randomseed(tonumber(ARGV[3]))
local now = now_us()

-- The events of each account, in batch order: ARGV positions; and every event's ids field.
local accounts, events_of, fields = {}, {}, {}
for i = 6, #ARGV, 4 do
  local number = tonumber(ARGV[i])
  local events = events_of[number]
  if events then
    events[#events + 1] = i
  else
    events_of[number] = {i}
    accounts[#accounts + 1] = number
  end
  fields[#fields + 1] = ARGV[i + 1] .. ':' .. ARGV[i + 2]
end
local function key_of(number, offset)
  return KEYS[6 + per_account * (number - 1) + offset]
end
local seen_now = in_chunks('HMGET', ids_now, fields)
local seen_before = in_chunks('HMGET', ids_before, fields)
local seq_keys = {}
for n, number in ipairs(accounts) do seq_keys[n] = key_of(number, 3) end
local seqs = in_chunks('MGET', nil, seq_keys)

local out, given, new_ids, new_seqs, grown = {}, {}, {}, {}, {}
local accepted, refused, none = 0, 0, {}
for n, number in ipairs(accounts) do
  local events = events_of[number]
  local legacy_now, legacy_before = none, none
  if legacy then
    local ids = {}
    for k, i in ipairs(events) do ids[k] = ARGV[i + 2] end
    legacy_now = in_chunks('HMGET', key_of(number, 4), ids)
    legacy_before = in_chunks('HMGET', key_of(number, 5), ids)
  end
  local backlog = cap > 0 and redis.call('LLEN', key_of(number, 1)) or 0
  local last, bodies = tonumber(seqs[n]), {}
  for k, i in ipairs(events) do
    local at = (i - 6) / 4 + 1  -- this event's place in the batch
    local field = fields[at]
    local seen = seen_now[at] or seen_before[at] or legacy_now[k] or legacy_before[k]
      or given[field]
    if seen then
      out[2 * at - 1], out[2 * at] = 0, tonumber(seen)
    elseif cap > 0 and backlog + #bodies >= cap then
      out[2 * at - 1], out[2 * at] = 2, 0
      refused = refused + 1
    else
      last = math.max((last or 0) + 1, now)
      local text = digits(last)
      given[field] = text
      new_ids[#new_ids + 1], new_ids[#new_ids + 2] = field, text
      bodies[#bodies + 1] = '{"seq":' .. text .. ',' .. ARGV[i + 3]
      out[2 * at - 1], out[2 * at] = 1, last
    end
  end
  if #bodies > 0 then
    local length = in_chunks('RPUSH', key_of(number, 1), bodies)
    new_seqs[#new_seqs + 1], new_seqs[#new_seqs + 2] = key_of(number, 3), digits(last)
    grown[#grown + 1] = {number, ARGV[events[1] + 1], length, #bodies}
    accepted = accepted + #bodies
  end
end
if accepted == 0 then
  if refused > 0 then redis.call('HINCRBY', stats, 'refused', refused) end
  return out
end
in_chunks('HSET', ids_now, new_ids)
redis.call('PEXPIRE', ids_now, ttl)
in_chunks('MSET', nil, new_seqs)
redis.call('HINCRBY', stats, 'accepted', accepted)
if refused > 0 then redis.call('HINCRBY', stats, 'refused', refused) end

-- Into the active set when its pending list was empty (else it is a member already), and
-- ready on its whole new backlog unless an owner holds it or it is paused.
local fresh, locks, names = {}, {}, {}
for n, account in ipairs(grown) do
  if account[3] == account[4] then fresh[#fresh + 1] = account[2] end
  locks[n], names[n] = key_of(account[1], 2), account[2]
end
if #fresh > 0 then in_chunks('SADD', active, fresh) end
local held = in_chunks('MGET', nil, locks)
local halted = in_chunks('HMGET', paused, names)
local scores = {}
for n, account in ipairs(grown) do
  if not held[n] and not halted[n] then
    local rand = order == 'random' and tostring(math.random()) or '0'
    local score = ready_score(key_of(account[1], 1), order, rand, account[3])
    scores[#scores + 1], scores[#scores + 2] = score, account[2]
  end
end
if #scores > 0 then add_ready(ready, scores, order) end
return out
