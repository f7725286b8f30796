-- ack: the handler succeeded; drop the in-flight event and decide what the slot does next.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score, 5 seq and 6 attempt of
--       the acked event, 7 want next ('1' or '0'), 8 switch margin and 9 best ready score
--       elsewhere (next_step in _lib.lua)
-- Returns {'event', body, attempt} (the next one, still owned), {'released'}, {'drained'}
-- or {'lost'} (not acked: the lease is gone, nothing changed). Sent again: the same answer.
local account, token, seq, attempt = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
if not holds(token, seq, attempt) then
  return replayed(token, seq, attempt, 'ack') or {'lost'}
end
redis.call('DEL', in_flight, attempt_key)
redis.call('HINCRBY', stats, 'acked', 1)
redis.call('HINCRBY', totals, 'acked', 1)
local reply = next_step(account, token, ARGV[3], ARGV[4], ARGV[7], ARGV[8], ARGV[9])
return remember(token, seq, attempt, 'ack', reply, 'last_acked_seq', seq)
