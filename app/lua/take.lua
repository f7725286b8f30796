-- take: the owner takes the head event, after recovering one a dead owner left in flight.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, or 'claim' inside the claim's MULTI right after its INCR
--       of the lock (a lock of 1 means that INCR won, and the token is the fence), or 'resume'
--       after the reply of that MULTI was lost, 3 claim id, 4 claim order, 5 random score
-- Returns {'event', body, attempt} (with 'resume': and the token), {'drained'} (nothing to do,
-- released) or {'lost'}. Sent again by the same owner, it hands out the same attempt.
local account, token, claim = ARGV[1], ARGV[2], ARGV[3]
if token == 'resume' then
  if redis.call('HGET', attempt_key, 'claim') == claim then
    token = redis.call('HGET', attempt_key, 'token')
    local held = owns(token) and held_by(token)
    if held then return {'event', held[2], held[3], token} end
  end
  reready(account, ARGV[4], ARGV[5])
  return {'lost'}
end
if token == 'claim' then
  if redis.call('GET', lock) ~= '1' then return {'lost'} end
  token = redis.call('GET', fence)
  forget_old_calls()
elseif not owns(token) then
  return {'lost'}
else
  local held = held_by(token)
  if held then return held end
end
recover()
local taken = take_head(token)
if not taken then return release(account, ARGV[4], ARGV[5]) end
if ARGV[2] == 'claim' then redis.call('HSET', attempt_key, 'claim', claim) end
return taken
