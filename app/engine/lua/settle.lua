-- settle: the acks and nacks of one consumer's loop turn in one shard, account by account, as
-- `ack` and `nack` in _lib.lua settle each (one call, however many accounts).
-- KEYS: 1 ready index, 2 stats, 3 active set, 4 dead letters, 5 paused accounts, 6 dead
--       letters' order, then 4 per account: pending list, lock, state hash, seq
-- ARGV: 1 claim order, 2 random seed (claim order random), 3 switch margin, 4 best ready
--       score elsewhere, 5 dead letters the shard keeps, 6 '1' to park an account with a
--       dead-lettered event, 7 the most events to hand out next (k), then 10 per account:
--       'ack' or 'nack', account, fencing token, seq and attempt of the first event of the
--       batch in flight, how many of its events were handled (for a nack: before the failed
--       one), the seq of the last of those ('0' for none), want next ('1' or '0'), and for a
--       nack the dead-letter entry ('' to retry) and the event id ('' for an ack)
-- Returns one reply per account, in order, as `ack` and `nack` answer; the shard's acked and
-- nacked counts grow once per call. Sent again: the same replies, nothing changed (each settle
-- is answered from its call record).
local shard = {
  ready = KEYS[1], stats = KEYS[2], active = KEYS[3], dead = KEYS[4], paused = KEYS[5],
  dead_order = KEYS[6],
}
local p = {
  order = ARGV[1], margin = ARGV[3], elsewhere = ARGV[4], dead_max = ARGV[5], park = ARGV[6],
}
local k = tonumber(ARGV[7])
math.randomseed(tonumber(ARGV[2]))
local replies, acked, nacked = {}, 0, 0
for n = 0, (#KEYS - 6) / 4 - 1 do
  local at, a = 6 + 4 * n, 7 + 10 * n
  local c = account_keys(shard, KEYS[at + 1], KEYS[at + 2], KEYS[at + 3], KEYS[at + 4])
  local s = {
    account = ARGV[a + 2], token = ARGV[a + 3], seq = ARGV[a + 4], attempt = ARGV[a + 5],
    count = tonumber(ARGV[a + 6]), last_seq = ARGV[a + 7], want_next = ARGV[a + 8],
    entry = ARGV[a + 9], event_id = ARGV[a + 10], k = k,
    rand = p.order == 'random' and tostring(math.random()) or '0',
  }
  local done, failed
  if ARGV[a + 1] == 'ack' then
    replies[n + 1], done = ack(c, s, p)
  else
    replies[n + 1], done, failed = nack(c, s, p)
    if failed then nacked = nacked + 1 end
  end
  flush(c)
  acked = acked + done
end
if acked > 0 then redis.call('HINCRBY', shard.stats, 'acked', acked) end
if nacked > 0 then redis.call('HINCRBY', shard.stats, 'nacked', nacked) end
return replies
