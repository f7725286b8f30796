-- take: the owner takes a batch from the head, after recovering one a dead owner left in
-- flight.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, or 'claim' inside the claim's MULTI right after its INCR
--       of the lock (a lock of 1 means that INCR won: the account leaves the ready index and
--       the token is the fence, raised to the clock by fresh_token), or 'resume' after the
--       reply of that MULTI was lost, 3 claim order, 4 random score, 5 claim id, 6 the most
--       events to take (k)
-- Returns {'event', body, attempt, more bodies...} (with 'claim' and 'resume': and the
-- token), {'drained'} or {'released'} (nothing to take, or the account is paused: released;
-- with 'claim': and the token) or {'lost'}. Sent again by the same owner, it hands out the
-- same batch.
local account, token, claim = ARGV[1], ARGV[2], nil
if token == 'resume' then
  if redis.call('HGET', state, 'claim') == ARGV[5] then
    token = redis.call('HGET', state, 'token')
    local held = owns(token) and held_by(token)
    if held then
      held[#held + 1] = token
      return held
    end
  end
  reready(account, ARGV[3], ARGV[4])
  return {'lost'}
end
if token == 'claim' then
  if redis.call('GET', lock) ~= '1' then return {'lost'} end
  redis.call('ZREM', ready, account)
  redis.call('PERSIST', state)
  token, claim = fresh_token(), ARGV[5]
  forget_old_calls()
elseif not owns(token) then
  return {'lost'}
else
  local held = held_by(token)
  if held then return held end
end
recover()
local taken = take_head(token, claim, tonumber(ARGV[6]))
-- The claim's token is stored in the fence once the take has not failed (a drained account's
-- state keeps the TTL its release gave it).
if claim then stage('fence', token) end
taken = taken or release(account, ARGV[3], ARGV[4])
flush()
if claim then taken[#taken + 1] = token end
return taken
