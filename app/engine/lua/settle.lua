-- settle: the acks and nacks of one consumer's loop turn in one shard, account by account, as
-- `ack` and `nack` in _lib.lua settle each (one call, however many accounts).
-- KEYS: 1 ready index, 2 stats, 3 active set, 4 dead letters, 5 paused accounts, 6 dead
--       letters' order, then 7 per account: pending list, in-flight list, lock, fence,
--       attempt hash, seq, totals
-- ARGV: 1 claim order, 2 random seed (claim order random), 3 switch margin, 4 best ready
--       score elsewhere, 5 dead letters the shard keeps, 6 '1' to park an account with a
--       dead-lettered event, then 8 per account: 'ack' or 'nack', account, fencing token,
--       seq and attempt of the settled event, want next ('1' or '0'), and for a nack the
--       dead-letter entry ('' to retry) and the event id ('' for an ack)
-- Returns one reply per account, in order, as `ack` and `nack` answer; the shard's acked and
-- nacked counts grow once per call. Sent again: the same replies, nothing changed (each settle
-- is answered from its call record).
ready, stats, active, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
paused, dead_order = KEYS[5], KEYS[6]
local order, margin, elsewhere, dead_max, park = ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
math.randomseed(tonumber(ARGV[2]))
local replies, counts = {}, {ack = 0, nack = 0}
for n = 0, (#KEYS - 6) / 7 - 1 do
  local k, a = 6 + 7 * n, 6 + 8 * n
  pending, in_flight, lock, fence = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  attempt_key, seq_key, totals = KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
  local op, account, token = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local seq, attempt, want_next = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local rand = order == 'random' and tostring(math.random()) or '0'
  local settled
  if op == 'ack' then
    replies[n + 1], settled = ack(account, token, seq, attempt, order, rand, want_next, margin,
                                  elsewhere)
  else
    replies[n + 1], settled = nack(account, token, seq, attempt, order, rand, want_next, margin,
                                   elsewhere, ARGV[a + 7], dead_max, park, ARGV[a + 8])
  end
  if settled then counts[op] = counts[op] + 1 end
end
if counts.ack > 0 then redis.call('HINCRBY', stats, 'acked', counts.ack) end
if counts.nack > 0 then redis.call('HINCRBY', stats, 'nacked', counts.nack) end
return replies
