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
local c = layout(KEYS)
local account, token, claim = ARGV[1], ARGV[2], nil
if token == 'resume' then
  if redis.call('HGET', c.state, 'claim') == ARGV[5] then
    token = redis.call('HGET', c.state, 'token')
    local held = owns(c, token) and held_by(c, token)
    if held then
      held[#held + 1] = token
      return held
    end
  end
  reready(c, account, ARGV[3], ARGV[4])
  return {'lost'}
end
local taken
if token == 'claim' then
  if redis.call('GET', c.lock) ~= '1' then return {'lost'} end
  redis.call('ZREM', c.ready, account)
  redis.call('PERSIST', c.state)
  local st = redis.call('HMGET', c.state, 'fence', 'n', 'redo', 'paused', 'calls', 'size')
  token, claim = fresh_token(st[1]), ARGV[5]
  forget_old_calls(c, st[5])
  local back = recover(c, st[6])
  local redo = back > 1 and back or tonumber(st[3]) or 0
  taken = take_head(c, token, claim, tonumber(ARGV[6]), tonumber(st[2]) or 0, redo,
                    st[4] == '1')
elseif not owns(c, token) then
  return {'lost'}
else
  local held = held_by(c, token)
  if held then return held end
  recover(c)
  taken = take_head(c, token, claim, tonumber(ARGV[6]))
end
-- The claim's token is stored in the fence once the take has not failed (a drained account's
-- state keeps the TTL its release gave it).
if claim then stage(c, 'fence', token) end
taken = taken or release(c, account, ARGV[3], ARGV[4])
flush(c)
if claim then taken[#taken + 1] = token end
return taken
