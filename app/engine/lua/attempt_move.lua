-- attempt_move: move what a version before the state hash kept apart into the account's state
-- hash (upgrade.py): its attempt hash and its fence.
-- KEYS: the account layout (_lib.lua), then 12 the old attempt hash, 13 the old fence
-- ARGV: none
-- The attempt hash's n, token, seq and claim become the state's, unless the state has an n
-- already (this version took the account since). The old fence becomes the state's when it is
-- larger and the state exists (else the next claim's token is raised to the clock anyway).
-- Both old keys are deleted. Returns 1 when there was one to move, else 0. Sent again: 0,
-- nothing changed.
local c = layout(KEYS)
local moved = 0
local old = redis.call('HMGET', KEYS[12], 'n', 'token', 'seq', 'claim')
if old[1] or old[2] or old[3] or old[4] then
  if not redis.call('HGET', c.state, 'n') then
    for i, field in ipairs({'n', 'token', 'seq', 'claim'}) do
      if old[i] then stage(c, field, old[i]) end
    end
  end
  redis.call('DEL', KEYS[12])
  moved = 1
end
local fence = redis.call('GET', KEYS[13])
if fence then
  local kept = redis.call('HGET', c.state, 'fence')
  if (kept or c.any_staged) and tonumber(fence) > (tonumber(kept) or 0) then
    stage(c, 'fence', fence)
  end
  redis.call('DEL', KEYS[13])
  moved = 1
end
flush(c)
return moved
