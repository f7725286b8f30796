-- ack: the handler succeeded; drop the in-flight event and decide what the slot does next.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score, 5 want next ('1' or '0'),
--       6 seq of the acked event, 7 switch margin (next_step in _lib.lua)
-- Returns {'event', body, attempt} (the next one, still owned), {'released'}, {'drained'}
-- or {'lost'} (the lease is gone; nothing changed).
if not owns(ARGV[2]) then return {'lost'} end
redis.call('DEL', in_flight, attempt_key)
redis.call('HINCRBY', stats, 'acked', 1)
redis.call('HINCRBY', totals, 'acked', 1)
redis.call('HSET', totals, 'last_acked_seq', ARGV[6])
return next_step(ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[7])
