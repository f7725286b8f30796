-- renew: extend the owner's lease while its handler runs.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 fencing token, 2 lease ms
-- Returns 1 when renewed, 0 when the lease is already lost. The lease belongs to the claim,
-- not to one event, so the token names it; sent again, it sets the same full lease.
local c = layout(KEYS)
if not owns(c, ARGV[1]) then return 0 end
redis.call('PEXPIRE', c.lock, ARGV[2])
return 1
