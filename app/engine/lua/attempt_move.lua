-- attempt_move: move the attempt hash a version before the state hash kept apart into the
-- account's state hash (upgrade.py).
-- KEYS: the account layout (_lib.lua), then 13 the old attempt hash
-- ARGV: none
-- Its n, token, seq and claim become the state's, unless the state has an n already (this
-- version took the account since). Returns 1 when there was one to move, else 0. Sent again:
-- 0, nothing changed.
local old = redis.call('HMGET', KEYS[13], 'n', 'token', 'seq', 'claim')
if not (old[1] or old[2] or old[3] or old[4]) then return 0 end
if not redis.call('HGET', state, 'n') then
  for i, field in ipairs({'n', 'token', 'seq', 'claim'}) do
    if old[i] then stage(field, old[i]) end
  end
  flush()
end
redis.call('DEL', KEYS[13])
return 1
