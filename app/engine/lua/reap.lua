-- reap: put an orphaned account (work left, no owner, not ready) back in the ready index.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 claim order, 3 random score
-- Returns 1 when the account was made ready again, else 0. Sent again: 0, nothing changed.
return reready(layout(KEYS), ARGV[1], ARGV[2], ARGV[3])
