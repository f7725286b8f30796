-- push: accept one event for an account.
-- KEYS: the account layout (_lib.lua), 12 dedupe bucket now, 13 dedupe bucket before
-- ARGV: 1 account, 2 event body after its opening brace, 3 event_id, 4 dedupe bucket TTL ms,
--       5 claim order, 6 random score
-- Returns {1, seq} when queued, {0, seq} when the event_id was accepted within the window.
local seen = redis.call('HGET', KEYS[12], ARGV[3]) or redis.call('HGET', KEYS[13], ARGV[3])
if seen then return {0, tonumber(seen)} end
local seq = redis.call('INCR', seq_key)
redis.call('HSET', KEYS[12], ARGV[3], seq)
redis.call('PEXPIRE', KEYS[12], ARGV[4])
redis.call('RPUSH', pending, '{"seq":' .. seq .. ',' .. ARGV[2])
redis.call('HINCRBY', stats, 'accepted', 1)
redis.call('SADD', active, ARGV[1])
if redis.call('EXISTS', lock) == 0 then make_ready(ARGV[1], ARGV[5], ARGV[6]) end
return {1, seq}
