-- nack: the handler failed; retry the event in place or dead-letter it and go on.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score, 5 want next ('1' or '0'),
--       6 dead-letter entry (JSON), or '' to retry, 7 switch margin (next_step in _lib.lua)
-- Returns {'retry'} (back at the head, still owned), a next step as ack.lua does, or {'lost'}.
if not owns(ARGV[2]) then return {'lost'} end
redis.call('HINCRBY', stats, 'nacked', 1)
if ARGV[6] == '' then
  redis.call('LMOVE', in_flight, pending, 'RIGHT', 'LEFT')
  if ARGV[5] ~= '1' then return release(ARGV[1], ARGV[3], ARGV[4]) end
  return {'retry'}
end
redis.call('RPUSH', dead, ARGV[6])
redis.call('DEL', in_flight, attempt_key)
redis.call('HINCRBY', stats, 'dead', 1)
redis.call('HINCRBY', totals, 'dead', 1)
return next_step(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[7])
