-- dead_move: move up to ARGV[1] of the oldest dead letters from the shard's list (how they
-- were kept before they had ids) into the hash and order they are kept in now.
-- KEYS: 1 the old list, 2 dead letters (hash), 3 their order (zset)
-- ARGV: 1 how many to move in this call
-- The moved ones score below every later one (scores of new dead letters start at 1), in
-- their old order. Returns how many are left in the old list. Sent again: moves the next ones.
local old, entries, ordered = KEYS[1], KEYS[2], KEYS[3]
local left = redis.call('LLEN', old)
local moving = redis.call('LRANGE', old, 0, tonumber(ARGV[1]) - 1)
for i, entry in ipairs(moving) do
  local letter = cjson.decode(entry)
  local id = string.format('%d:%s', letter['account'], letter['event_id'])
  redis.call('HSET', entries, id, entry)
  redis.call('ZADD', ordered, i - left - 1, id)
end
redis.call('LTRIM', old, #moving, -1)
return left - #moving
