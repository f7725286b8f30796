-- release: the owner gives the account up; the batch in flight goes back to the head.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score, 5 seq and 6 attempt of
--       the first event of the batch the owner holds (0 and 0 for none), 7 '1' when the
--       batch reached the handler, '0' when it never ran (then its attempt is not counted)
-- Returns {'released'}, {'drained'} or {'lost'}. Sent again: the same answer.
local c = layout(KEYS)
local account, token, seq, attempt = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local again = replayed(c, token, seq, attempt, 'release')
if again then return again end
if not owns(c, token) then return {'lost'} end
if ARGV[7] == '0' and held_by(c, token) then redis.call('HINCRBY', c.state, 'n', -1) end
local reply = remember(c, token, seq, attempt, 'release', release(c, account, ARGV[3], ARGV[4]))
flush(c)
return reply
