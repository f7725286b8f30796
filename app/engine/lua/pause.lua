-- pause: hold an account. It keeps accepting events but is not claimed; an owner releases it
-- after its current event (next_step and take_head in _lib.lua).
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account
-- Returns {why it was already paused ('operator' or 'parked'), or '' when it was not;
-- 1 when a consumer holds it now, else 0}. Sent again: the same state.
local account = ARGV[1]
local before = redis.call('HGET', paused, account)
if not before then redis.call('HSET', paused, account, 'operator') end
redis.call('ZREM', ready, account)
return {before or '', redis.call('EXISTS', lock)}
