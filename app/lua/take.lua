-- take: the owner takes the head event, after recovering one a dead owner left in flight.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, or '' inside the claim's MULTI right after its INCR of the
--       lock: then a lock of 1 means that INCR won, and the token is the fence, 3 claim order,
--       4 random score
-- Returns {'event', body, attempt}, {'drained'} (nothing to do, released) or {'lost'}.
local token = ARGV[2]
if token == '' then
  if redis.call('GET', lock) ~= '1' then return {'lost'} end
  token = redis.call('GET', fence)
end
if not owns(token) then return {'lost'} end
recover()
return take_head() or release(ARGV[1], ARGV[3], ARGV[4])
