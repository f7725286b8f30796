-- forget_pause: drop the pause of an account that holds nothing and whose state has expired
-- (pause.lua makes a pause of an empty account age with its state).
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account
-- Returns 1 when the pause was dropped, else 0. Sent again: 0, nothing changed.
local c = layout(KEYS)
if redis.call('EXISTS', c.pending, c.lock, c.seq_key, c.state) > 0 then return 0 end
return redis.call('HDEL', c.paused, ARGV[1])
