-- dead: replay or purge dead letters of one shard.
-- KEYS: 1 dead letters, 2 ready index, 3 stats, 4 active set, 5 paused accounts of the shard,
--       then 2 per account of the call: pending list, lock
-- ARGV: 1 'replay' or 'purge', 2 claim order, 3 random seed, then 4 per entry: the account's
--       number among the call's accounts (1 for the first one's keys), account, the
--       dead-letter entry exactly as stored, and the event body to queue again ('' to purge).
-- The entries of one account come newest first: each replayed one goes to the head of the
-- pending list, so they land in seq order ahead of what is pending. A replayed account that
-- was parked is no longer paused, and it is made ready unless a consumer holds it (that one
-- takes the replayed events next). An entry that is no longer a dead letter (replayed or
-- purged meanwhile, or trimmed) is skipped, so a call sent again changes nothing.
-- Returns how many entries were replayed or purged.
dead, ready, stats, active, paused = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode, order = ARGV[1], ARGV[2]
math.randomseed(tonumber(ARGV[3]))
local wanted = {}
for i = 4, #ARGV, 4 do wanted[ARGV[i + 2]] = true end
local entries = redis.call('LRANGE', dead, 0, -1)
local kept, found = {}, {}
for _, entry in ipairs(entries) do
  if wanted[entry] and not found[entry] then
    found[entry] = true
  else
    kept[#kept + 1] = entry
  end
end
local done = #entries - #kept
if done == 0 then return 0 end
redis.call('DEL', dead)
for i = 1, #kept, 1000 do
  redis.call('RPUSH', dead, unpack(kept, i, math.min(i + 999, #kept)))
end
if mode ~= 'replay' then
  redis.call('HINCRBY', stats, 'purged', done)
  return done
end
local base, accounts = {}, {}
for i = 4, #ARGV, 4 do
  local account = ARGV[i + 1]
  if found[ARGV[i + 2]] then
    local at = 6 + 2 * (tonumber(ARGV[i]) - 1)
    redis.call('LPUSH', KEYS[at], ARGV[i + 3])
    if not base[account] then
      base[account] = at
      accounts[#accounts + 1] = account
    end
  end
end
for _, account in ipairs(accounts) do
  -- _lib.lua's make_ready reads these locals: point them at this account.
  pending, lock = KEYS[base[account]], KEYS[base[account] + 1]
  redis.call('SADD', active, account)
  if redis.call('HGET', paused, account) == 'parked' then redis.call('HDEL', paused, account) end
  if redis.call('EXISTS', lock) == 0 then
    make_ready(account, order, tostring(math.random()))
  end
end
redis.call('HINCRBY', stats, 'replayed', done)
return done
