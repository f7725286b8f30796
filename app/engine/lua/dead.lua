-- dead: replay or purge dead letters of one shard, each found by its id.
-- KEYS: 1 dead letters (hash of '<account>:<event_id>' -> entry), 2 their order (zset),
--       3 ready index, 4 stats, 5 active set, 6 paused accounts of the shard,
--       then 3 per account of the call: pending list, lock, state hash
-- ARGV: 1 'replay' or 'purge', 2 claim order, 3 random seed, then 5 per entry: the account's
--       number among the call's accounts (1 for the first one's keys), account, the dead
--       letter's id, the entry exactly as read, and the event body to queue again ('' to purge).
-- The entries of one account come newest first: each replayed one goes to the head of the
-- pending list, behind a batch in flight, so they land in seq order ahead of what is pending.
-- A replayed account that was parked is no longer paused, and it is made ready unless a
-- consumer holds it (that one takes the replayed events next). An entry no longer stored as
-- read (replayed or purged meanwhile, trimmed, or dead again since) is skipped, so a call
-- sent again changes nothing.
-- Each entry costs a few commands whatever the number of dead letters.
-- Returns how many entries were replayed or purged.
local shard = {
  dead = KEYS[1], dead_order = KEYS[2], ready = KEYS[3], stats = KEYS[4], active = KEYS[5],
  paused = KEYS[6],
}
local mode, order = ARGV[1], ARGV[2]
math.randomseed(tonumber(ARGV[3]))
local done, base, accounts, bodies_of = 0, {}, {}, {}
for i = 4, #ARGV, 5 do
  local account, id, entry = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HGET', shard.dead, id) == entry then
    redis.call('HDEL', shard.dead, id)
    redis.call('ZREM', shard.dead_order, id)
    done = done + 1
    if mode == 'replay' then
      if not base[account] then
        base[account] = 7 + 3 * (tonumber(ARGV[i]) - 1)
        accounts[#accounts + 1] = account
        bodies_of[account] = {}
      end
      table.insert(bodies_of[account], ARGV[i + 4])
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
  local c = account_keys(shard, KEYS[at], KEYS[at + 1], KEYS[at + 2])
  -- Behind the batch in flight, which stays first at the head until it is settled.
  local size, flying = tonumber(redis.call('HGET', c.state, 'size')) or 0, {}
  if size > 0 then
    flying = redis.call('LRANGE', c.pending, 0, size - 1)
    redis.call('LTRIM', c.pending, size, -1)
  end
  in_chunks('LPUSH', c.pending, bodies_of[account])
  to_head(c.pending, flying)
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
