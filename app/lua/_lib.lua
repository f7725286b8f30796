-- Shared by every account script; scripts.py prepends it to each one.
-- KEYS layout (keys.py builds it, every per-account key shares the account's hash tag):
--   1 pending list, 2 in-flight list, 3 lock, 4 fence, 5 attempt, 6 seq,
--   7 ready index, 8 stats, 9 active set, 10 dead letters, 11 account totals
local pending, in_flight, lock, fence, attempt_key, seq_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ready, stats, active, dead, totals = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]

-- The claim MULTI increments lock and fence together, so while the lock lives the owner's
-- token is fence - lock + 1: no owner field to keep in sync, and a stale token never matches.
local function owns(token)
  local held = redis.call('GET', lock)
  if not held then return false end
  return tonumber(redis.call('GET', fence)) - tonumber(held) + 1 == tonumber(token)
end

-- Score of this account in the ready index for the claim order; the lowest pops first.
-- Returned as a string so large scores reach ZADD without float formatting. `backlog`: the
-- pending list's length when the caller knows it.
local function ready_score(order, rand, backlog)
  if order == 'longest' then return tostring(-(backlog or redis.call('LLEN', pending))) end
  if order == 'oldest' then
    local enq_ns = string.match(redis.call('LINDEX', pending, 0), '"enq_ns":(%d+)')
    return string.sub(enq_ns, 1, -4)
  end
  return rand
end

local function make_ready(account, order, rand, backlog)
  if order == 'random' then
    redis.call('ZADD', ready, 'NX', ready_score(order, rand), account)
  else
    redis.call('ZADD', ready, ready_score(order, rand, backlog), account)
  end
end

-- An event left in flight by an owner that died goes back to the head, first in line.
local function recover()
  if redis.call('LLEN', in_flight) > 0 then
    redis.call('LMOVE', in_flight, pending, 'RIGHT', 'LEFT')
    redis.call('HINCRBY', stats, 'redelivered', 1)
  end
end

local function take_head()
  local body = redis.call('LMOVE', pending, in_flight, 'LEFT', 'RIGHT')
  if not body then return nil end
  return {'event', body, redis.call('INCR', attempt_key)}
end

-- Give the account up: back into the ready index while it has work, else out of the active set.
local function release(account, order, rand)
  if redis.call('LLEN', in_flight) > 0 then
    redis.call('LMOVE', in_flight, pending, 'RIGHT', 'LEFT')
  end
  redis.call('DEL', lock)
  if redis.call('LLEN', pending) > 0 then
    make_ready(account, order, rand)
    return {'released'}
  end
  redis.call('SREM', active, account)
  return {'drained'}
end

-- After an event is settled: take the next one while this account is still the best choice,
-- otherwise put it back. The best waiting account must beat this one's score by `margin`.
local function next_step(account, order, rand, want_next, margin)
  if want_next ~= '1' or redis.call('LLEN', pending) == 0 then
    return release(account, order, rand)
  end
  if order ~= 'random' then
    local best = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
    if best[2] and tonumber(best[2]) <= tonumber(ready_score(order, rand)) - tonumber(margin) then
      return release(account, order, rand)
    end
  end
  return take_head()
end
