-- attempt_move: move what older versions kept apart into the account's state hash and
-- pending list (upgrade.py): its attempt hash, its fence and its in-flight list.
-- KEYS: the account layout (_lib.lua), then 11 the old attempt hash, 12 the old fence, 13 the
--       old in-flight list
-- ARGV: none
-- The attempt hash's n, token, seq and claim become the state's, unless the state has an n
-- already (this version took the account since). The old fence becomes the state's when it is
-- larger and the state exists (else the next claim's token is raised to the clock anyway).
-- The old in-flight list goes back to the head, first in line, as the batch of an owner that
-- died (its consumers were stopped for the upgrade): no longer in flight, handed out again one
-- at a time when it held more than one event (recover in _lib.lua).
-- The old keys are deleted. Returns 1 when there was one to move, else 0. Sent again: 0,
-- nothing changed.
local c = layout(KEYS)
local moved = 0
local old = redis.call('HMGET', KEYS[11], 'n', 'token', 'seq', 'claim')
if old[1] or old[2] or old[3] or old[4] then
  if not redis.call('HGET', c.state, 'n') then
    for i, field in ipairs({'n', 'token', 'seq', 'claim'}) do
      if old[i] then stage(c, field, old[i]) end
    end
  end
  redis.call('DEL', KEYS[11])
  moved = 1
end
local fence = redis.call('GET', KEYS[12])
if fence then
  local kept = redis.call('HGET', c.state, 'fence')
  if (kept or c.any_staged) and tonumber(fence) > (tonumber(kept) or 0) then
    stage(c, 'fence', fence)
  end
  redis.call('DEL', KEYS[12])
  moved = 1
end
local flying = redis.call('LRANGE', KEYS[13], 0, -1)
if #flying > 0 then
  to_head(c.pending, flying)
  redis.call('DEL', KEYS[13])
  recover(c, #flying)
  moved = 1
end
flush(c)
return moved
