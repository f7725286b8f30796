-- push: accept a batch of events, all or none (a script runs whole).
-- KEYS: 1 ready index, 2 stats, 3 active set
-- ARGV: 1..4 the key prefixes an account's tag completes (Keys.push_prefixes: pending, lock,
--       seq, dedupe), 5 dedupe bucket now, 6 dedupe bucket before, 7 bucket TTL ms,
--       8 claim order, 9 random seed (claim order random), then 3 per event: account,
--       event_id, body after its opening brace.
-- One call carries events of many accounts, so their keys are built here instead of declared
-- in KEYS; evq runs on one Redis (the claim's MULTI spans accounts as well).
-- Returns 2 per event: 1 and its seq when queued, 0 and the earlier seq when the event_id was
-- accepted within the dedupe window (an earlier event of this batch counts).
ready, stats, active = KEYS[1], KEYS[2], KEYS[3]
local pending_prefix, lock_prefix, seq_prefix, dedupe_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now_suffix, before_suffix, ttl, order = ':' .. ARGV[5], ':' .. ARGV[6], ARGV[7], ARGV[8]
math.randomseed(tonumber(ARGV[9]))
local out, accounts, tags, backlog, was_idle, accepted = {}, {}, {}, {}, {}, 0
for i = 10, #ARGV, 3 do
  local account, id = ARGV[i], ARGV[i + 1]
  local tag = '{' .. account .. '}'
  local bucket = dedupe_prefix .. tag .. now_suffix
  local seen = redis.call('HGET', bucket, id)
    or redis.call('HGET', dedupe_prefix .. tag .. before_suffix, id)
  if seen then
    out[#out + 1], out[#out + 2] = 0, tonumber(seen)
  else
    local seq = redis.call('INCR', seq_prefix .. tag)
    redis.call('HSET', bucket, id, seq)
    redis.call('PEXPIRE', bucket, ttl)
    local length = redis.call('RPUSH', pending_prefix .. tag, '{"seq":' .. seq .. ',' .. ARGV[i + 2])
    if not tags[account] then
      tags[account] = tag
      accounts[#accounts + 1] = account
      was_idle[account] = length == 1
    end
    backlog[account] = length
    accepted = accepted + 1
    out[#out + 1], out[#out + 2] = 1, seq
  end
end
-- Once per account that got events: into the active set if its pending list was empty (else
-- it is a member already), and ready on its whole new backlog unless an owner holds it.
-- No one sees the state between the loops.
for _, account in ipairs(accounts) do
  -- _lib.lua's make_ready reads these locals: point them at this account.
  pending, lock = pending_prefix .. tags[account], lock_prefix .. tags[account]
  if was_idle[account] then redis.call('SADD', active, account) end
  if redis.call('EXISTS', lock) == 0 then
    make_ready(account, order, tostring(math.random()), backlog[account])
  end
end
if accepted > 0 then redis.call('HINCRBY', stats, 'accepted', accepted) end
return out
