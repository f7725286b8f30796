-- take: the owner takes the head event, after recovering one a dead owner left in flight.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score
-- Returns {'event', body, attempt}, {'drained'} (nothing to do, released) or {'lost'}.
if not owns(ARGV[2]) then return {'lost'} end
recover()
return take_head() or release(ARGV[1], ARGV[3], ARGV[4])
