-- nack: the handler failed; retry the event in place or dead-letter it and go on.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score, 5 seq and 6 attempt of
--       the failed event, 7 want next ('1' or '0'), 8 switch margin and 9 best ready score
--       elsewhere (next_step in _lib.lua), 10 dead-letter entry (JSON), or '' to retry,
--       11 how many dead letters the shard keeps (the oldest go first), 12 '1' to park the
--       account with a dead-lettered event (POISON_POLICY=park: paused until an operator
--       replays the event or resumes the account), '0' to go on, 13 the event id
-- Returns {'retry'} (back at the head, still owned), a next step as ack.lua does, or {'lost'}.
-- Sent again: the same answer, nothing changed.
local account, token, seq, attempt = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
if not holds(token, seq, attempt) then
  return replayed(token, seq, attempt, 'nack') or {'lost'}
end
redis.call('HINCRBY', stats, 'nacked', 1)
local reply
if ARGV[10] == '' then
  redis.call('LMOVE', in_flight, pending, 'RIGHT', 'LEFT')
  reply = {'retry'}
  if ARGV[7] ~= '1' then reply = release(account, ARGV[3], ARGV[4]) end
else
  local id = account .. ':' .. ARGV[13]
  redis.call('HSET', dead, id, ARGV[10])
  redis.call('ZADD', dead_order, redis.call('HINCRBY', stats, 'dead', 1), id)
  local over = redis.call('ZCARD', dead_order) - tonumber(ARGV[11])
  if over > 0 then
    local dropped = redis.call('ZPOPMIN', dead_order, over)
    for i = 1, #dropped, 2 do redis.call('HDEL', dead, dropped[i]) end
  end
  redis.call('DEL', in_flight, attempt_key)
  redis.call('HINCRBY', totals, 'dead', 1)
  if ARGV[12] == '1' then redis.call('HSET', paused, account, 'parked') end
  reply = next_step(account, token, ARGV[3], ARGV[4], ARGV[7], ARGV[8], ARGV[9])
end
return remember(token, seq, attempt, 'nack', reply)
