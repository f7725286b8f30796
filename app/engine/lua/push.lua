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
ready, stats, active, paused = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, order, cap = ARGV[1], ARGV[2], tonumber(ARGV[4])
math.randomseed(tonumber(ARGV[3]))
local now = now_us()
local out, accounts, base, last, backlog, was_idle = {}, {}, {}, {}, {}, {}
local accepted, refused = 0, 0
for i = 5, #ARGV, 4 do
  local at, account, id = 5 + 5 * (tonumber(ARGV[i]) - 1), ARGV[i + 1], ARGV[i + 2]
  local seen = redis.call('HGET', KEYS[at + 3], id) or redis.call('HGET', KEYS[at + 4], id)
  if cap > 0 and not backlog[account] then backlog[account] = redis.call('LLEN', KEYS[at]) end
  if seen then
    out[#out + 1], out[#out + 2] = 0, tonumber(seen)
  elseif cap > 0 and backlog[account] >= cap then
    out[#out + 1], out[#out + 2] = 2, 0
    refused = refused + 1
  else
    local before = last[account] or tonumber(redis.call('GET', KEYS[at + 2])) or 0
    local seq = math.max(before + 1, now)
    local text = digits(seq)
    last[account] = seq
    redis.call('HSET', KEYS[at + 3], id, text)
    redis.call('PEXPIRE', KEYS[at + 3], ttl)
    local length = redis.call('RPUSH', KEYS[at], '{"seq":' .. text .. ',' .. ARGV[i + 3])
    if not base[account] then
      base[account] = at
      accounts[#accounts + 1] = account
      was_idle[account] = length == 1
    end
    backlog[account] = length
    accepted = accepted + 1
    out[#out + 1], out[#out + 2] = 1, seq
  end
end
-- Once per account that got events: its last seq stored, into the active set if its pending
-- list was empty (else it is a member already), and ready on its whole new backlog unless an
-- owner holds it or it is paused. No one sees the state between the loops.
for _, account in ipairs(accounts) do
  redis.call('SET', KEYS[base[account] + 2], digits(last[account]))
  -- _lib.lua's make_ready reads these locals: point them at this account.
  pending, lock = KEYS[base[account]], KEYS[base[account] + 1]
  if was_idle[account] then redis.call('SADD', active, account) end
  if redis.call('EXISTS', lock) == 0 then
    make_ready(account, order, tostring(math.random()), backlog[account])
  end
end
if accepted > 0 then redis.call('HINCRBY', stats, 'accepted', accepted) end
if refused > 0 then redis.call('HINCRBY', stats, 'refused', refused) end
return out
