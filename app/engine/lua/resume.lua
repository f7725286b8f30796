-- resume: let a paused or parked account be claimed again, at once. A parked account goes on
-- past its dead-lettered event, which stays in the dead letters.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 unused, 3 claim order, 4 random score
-- Returns {why it was paused, or '' when it was not; 1 when it went into the ready index}.
-- Sent again: {'', 0}, nothing changed (the account is no longer paused).
local c = layout(KEYS)
local account = ARGV[1]
local before = redis.call('HGET', c.paused, account)
if not before then return {'', 0} end
redis.call('HDEL', c.paused, account)
redis.call('HDEL', c.state, 'paused')
return {before, reready(c, account, ARGV[3], ARGV[4])}
