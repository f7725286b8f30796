-- reap: put an orphaned account (work left, no owner, not ready) back in the ready index.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 claim order, 3 random score
-- Returns 1 when the account was made ready again, else 0.
if redis.call('EXISTS', lock) == 1 or redis.call('ZSCORE', ready, ARGV[1]) then return 0 end
recover()
if redis.call('LLEN', pending) == 0 then
  redis.call('SREM', active, ARGV[1])
  return 0
end
make_ready(ARGV[1], ARGV[2], ARGV[3])
return 1
