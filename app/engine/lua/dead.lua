-- dead: replay or purge dead letters of one shard, each found by its id.
-- KEYS: 1 dead letters (hash of '<account>:<event_id>' -> entry), 2 their order (zset),
--       3 ready index, 4 stats, 5 active set, 6 paused accounts of the shard,
--       then 3 per account of the call: pending list, lock, state hash
-- ARGV: 1 'replay' or 'purge', 2 claim order, 3 random seed, then 5 per entry: the account's
--       number among the call's accounts (1 for the first one's keys), account, the dead
--       letter's id, the entry exactly as read, and the event body to queue again ('' to purge).
-- The entries of one account come newest first: each replayed one goes to the head of the
-- pending list, so they land in seq order ahead of what is pending. A replayed account that
-- was parked is no longer paused, and it is made ready unless a consumer holds it (that one
-- takes the replayed events next). An entry no longer stored as read (replayed or purged
-- meanwhile, trimmed, or dead again since) is skipped, so a call sent again changes nothing.
-- Each entry costs a few commands whatever the number of dead letters.
-- Returns how many entries were replayed or purged.
local shard = {
  dead = KEYS[1], dead_order = KEYS[2], ready = KEYS[3], stats = KEYS[4], active = KEYS[5],
  paused = KEYS[6],
}
local mode, order = ARGV[1], ARGV[2]
math.randomseed(tonumber(ARGV[3]))
local done, base, accounts = 0, {}, {}
for i = 4, #ARGV, 5 do
  local account, id, entry = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HGET', shard.dead, id) == entry then
    redis.call('HDEL', shard.dead, id)
    redis.call('ZREM', shard.dead_order, id)
    done = done + 1
    if mode == 'replay' then
      local at = 7 + 3 * (tonumber(ARGV[i]) - 1)
      redis.call('LPUSH', KEYS[at], ARGV[i + 4])
      if not base[account] then
        base[account] = at
        accounts[#accounts + 1] = account
      end
    end
  end
end
if done == 0 then return 0 end
if mode ~= 'replay' then
  redis.call('HINCRBY', shard.stats, 'purged', done)
  return done
end
for _, account in ipairs(accounts) do
  local at = base[account]
  local c = account_keys(shard, KEYS[at], nil, KEYS[at + 1], KEYS[at + 2])
  redis.call('SADD', shard.active, account)
  if redis.call('HGET', shard.paused, account) == 'parked' then
    redis.call('HDEL', shard.paused, account)
    redis.call('HDEL', c.state, 'paused')
  end
  if redis.call('EXISTS', c.lock) == 0 then
    make_ready(c, account, order, tostring(math.random()))
  end
end
redis.call('HINCRBY', shard.stats, 'replayed', done)
return done
