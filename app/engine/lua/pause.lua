-- pause: hold an account. It keeps accepting events but is not claimed; an owner releases it
-- after its current event (next_step and take_head in _lib.lua).
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account
-- An account that holds nothing keeps its pause as long as its other state would: its state
-- hash is made to expire after ACCOUNT_IDLE_MS, and once every key of it has, the reaper forgets
-- the pause (forget_pause.lua). Events pushed meanwhile keep it, as they keep the account.
-- Returns {why it was already paused ('operator' or 'parked'), or '' when it was not;
-- 1 when a consumer holds it now, else 0}. Sent again: the same state; on an account paused
-- before the state hash mirrored it, it sets the mirror (upgrade.py).
local c = layout(KEYS)
local account = ARGV[1]
local before = redis.call('HGET', c.paused, account)
if not before then redis.call('HSET', c.paused, account, 'operator') end
if redis.call('EXISTS', c.state) == 1 then
  redis.call('HSET', c.state, 'paused', '1')
elseif not before then
  redis.call('HSET', c.state, 'paused', '1', 'paused_us', now_us())
  redis.call('PEXPIRE', c.state, ACCOUNT_IDLE_MS)
end
redis.call('ZREM', c.ready, account)
return {before or '', redis.call('EXISTS', c.lock)}
