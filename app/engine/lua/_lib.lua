-- Shared by every evq function: scripts.py loads it, then each script of this folder as one
-- function, into one library (FUNCTION LOAD), once per master.
-- KEYS layout of one account (keys.py builds it, every key carries the hash tag of the
-- account's shard):
--   1 pending list, 2 lock, 3 state hash, 4 seq, 5 ready index, 6 stats, 7 active set,
--   8 dead letters of the shard (hash of '<account>:<event_id>' -> entry), 9 paused accounts
--   of the shard (account -> 'operator' or 'parked'), 10 the dead letters' ids scored by when
--   they died
-- A helper takes the keys it works on as its first parameter `c`, an account's keys by name
-- (`account_keys`, `layout`), which also holds the state fields the call stages. Nothing is
-- kept between calls: the library's chunk runs once, at its load.
-- In flight: the batch the owner was handed, up to k events of the head, which stay at the
-- head of the pending list until they are settled (`size` of them): a take moves nothing,
-- and a batch given back is simply no longer in flight. A 1 s handler gets one at a time.
-- The state hash, read with one HMGET and written with one HSET per call (`stage`, `flush`):
--   fence  the source of fencing tokens: the claim MULTI increments it with the lock
--   n      attempts handed out of the batch's first event, or of the head (every other event
--          of a batch is at its first attempt)
--   token  the owner that took the batch in flight, '' (or none) when nothing is in flight
--   size   how many events at the head are in flight, 0 (or none) when none are
--   seq    the batch's first event; claim: the claim that took it, when one did
--   redo   how many events at the head were in flight with an owner that died: they are
--          handed out one at a time, each at its next attempt, so a poison event among them
--          is retried alone and its neighbours are charged one attempt, not one per crash
--   paused '1' while the account is paused or parked: a mirror of the shard's paused hash,
--          which every writer of it keeps in step, so that a settle reads it with the rest
--   acked, dead, last_acked_seq   the account's settled counts
--   t:<token>  the last settling call of each recent token, '<seq>:<attempt>:<op>:<reply>':
--          a call sent again (a client retry after a lost reply) is answered from it and
--          changes nothing
--   calls  how many claims' tokens may have a call kept: at KEEP_CALLS, a claim drops the
--          oldest (forget_old_calls)
-- ACCOUNT_IDLE_MS (scripts.py puts it above this file): once an account is drained, its
-- seq and state expire after that long unless it is claimed again. Nothing depends on
-- them surviving: seqs and tokens never go below the server clock in microseconds (`now_us`).
-- Tokens whose last call is kept; older ones are dropped when the account is claimed again.
local KEEP_CALLS = 32

-- An account's keys by name, with the shard's keys of `shard` (a table of ready, stats,
-- active, dead, paused, dead_order; the ones a call does not pass are nil). `shard` itself
-- is kept too: the accounts of one call share what it caches (best_ready).
local function account_keys(shard, pending, lock, state, seq_key)
  return {
    pending = pending, lock = lock, state = state, seq_key = seq_key,
    ready = shard.ready, stats = shard.stats, active = shard.active, dead = shard.dead,
    paused = shard.paused, dead_order = shard.dead_order, shard = shard, staged = {},
    any_staged = false,
  }
end

-- The account's keys of the KEYS layout above.
local function layout(keys)
  local shard = {
    ready = keys[5], stats = keys[6], active = keys[7], dead = keys[8], paused = keys[9],
    dead_order = keys[10],
  }
  return account_keys(shard, keys[1], keys[2], keys[3], keys[4])
end

-- A field of the account's state hash to write by one HSET at the end of the call (flush); a
-- field staged twice keeps its last value.
local function stage(c, field, value)
  c.staged[field], c.any_staged = value, true
end

local function flush(c)
  if not c.any_staged then return end
  local pairs_of = {}
  for field, value in pairs(c.staged) do
    pairs_of[#pairs_of + 1] = field
    pairs_of[#pairs_of + 1] = value
  end
  redis.call('HSET', c.state, unpack(pairs_of))
  c.staged, c.any_staged = {}, false
end

-- The claim MULTI increments lock and fence together, so while the lock lives the owner's
-- token is fence - lock + 1: no owner field to keep in sync, and a stale token never matches.
-- `fence`: the state's, when the caller read it.
local function owns(c, token, fence)
  local held = redis.call('GET', c.lock)
  if not held then return false end
  fence = tonumber(fence or redis.call('HGET', c.state, 'fence'))
  return fence ~= nil and fence - tonumber(held) + 1 == tonumber(token)
end

-- The server clock in microseconds: the floor of every seq and token. A failover that loses
-- the newest writes, or the expiry of an idle account's state, cannot hand out a seq or a
-- token again, as long as the clock of the master that takes over is behind the old one's by
-- less than the failover (or the idle time) took. A number below 2^53, exact in Lua.
local function now_us()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- A seq or token as Redis and the event body take it (Lua would print 16 digits as 1.7e+15).
local function digits(n)
  return string.format('%.0f', n)
end

-- The token of a claim that just won (lock 1, so the token is the fence), raised to the
-- server clock when the fence (the state's, as the caller read it) is behind it. The caller
-- stores it in the fence once the take has succeeded.
local function fresh_token(fence)
  return digits(math.max(tonumber(fence) or 0, now_us()))
end

-- `command` (with `key` unless nil, and `option` unless nil) on every value, in calls of at
-- most CHUNK values (pairs stay whole: Lua's unpack has a limit); table replies joined, else
-- the last reply.
local CHUNK = 1000
local function in_chunks(command, key, values, option)
  local joined = {}
  for j = 1, #values, CHUNK do
    local args = {unpack(values, j, math.min(j + CHUNK - 1, #values))}
    if option then table.insert(args, 1, option) end
    if key then table.insert(args, 1, key) end
    local reply = redis.call(command, unpack(args))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do joined[#joined + 1] = value end
    else
      joined = reply
    end
  end
  return joined
end

-- `bodies` onto the head of the list `key`, first in line, in their order.
local function to_head(key, bodies)
  local reversed = {}
  for i = #bodies, 1, -1 do reversed[#reversed + 1] = bodies[i] end
  in_chunks('LPUSH', key, reversed)
end

-- A take reply: {'event', first body, its attempt, the batch's other bodies...}.
local function handed(bodies, attempt)
  local reply = {'event', bodies[1], attempt}
  for i = 2, #bodies do reply[i + 2] = bodies[i] end
  return reply
end

-- The batch in flight as a take reply, when `token` took it; nil otherwise.
local function held_by(c, token)
  local taken = redis.call('HMGET', c.state, 'token', 'n', 'size')
  local size = tonumber(taken[3]) or 0
  if taken[1] ~= token or size == 0 then return nil end
  return handed(redis.call('LRANGE', c.pending, 0, size - 1), tonumber(taken[2]))
end

-- Whether `token` owns the account and took the batch in flight, whose first event is this
-- attempt of `seq`; when it does, also the state's redo, acked and dead counts and whether the
-- account is paused. Once a call about that batch has landed it never holds again, so a call
-- sent twice is told apart from a new one.
local function holds(c, token, seq, attempt)
  local taken = redis.call('HMGET', c.state, 'token', 'n', 'seq', 'redo', 'acked', 'dead',
                           'paused', 'fence')
  if taken[1] ~= token or taken[2] ~= attempt or taken[3] ~= seq then return false end
  if not owns(c, token, taken[8]) then return false end
  return true, tonumber(taken[4]) or 0, tonumber(taken[5]) or 0, tonumber(taken[6]) or 0,
    taken[7] == '1'
end

-- The batch in flight is no longer: its events, still at the head, are first in line again.
local function back_to_head(c)
  stage(c, 'token', '')
  stage(c, 'size', 0)
end

-- Score of an account in the ready index for the claim order; the lowest pops first.
-- Returned as a string so large scores reach ZADD without float formatting. `pending`: the
-- account's list; `backlog`: its length when the caller knows it.
local function ready_score(pending, order, rand, backlog)
  if order == 'longest' then return tostring(-(backlog or redis.call('LLEN', pending))) end
  if order == 'oldest' then  -- a seq is when its event was queued, in microseconds
    return string.match(redis.call('LINDEX', pending, 0), '^{"seq":(%d+)')
  end
  return rand
end

-- Score/member pairs into the shard's ready index `ready` (for the random order, an account
-- already there keeps its score). When the index was empty, idle claimers are told on the
-- namespace's wake channel (they wait for it instead of polling every shard).
local function add_ready(ready, pairs, order)
  local was_empty = redis.call('ZCARD', ready) == 0
  in_chunks('ZADD', ready, pairs, order == 'random' and 'NX' or nil)
  if was_empty then
    redis.call('PUBLISH', string.match(ready, '^{(.+):%d+}:ready$') .. ':wake', '1')
  end
end

-- The best (lowest) score in the shard's ready index, nil when it is empty. Read once per
-- call: the accounts a settle covers share it (their shard's table keeps it, false for
-- empty), and make_ready keeps it up to date; nothing else in a settle changes the index.
local function best_ready(c)
  local shard = c.shard
  if shard.best == nil then
    shard.best = tonumber(redis.call('ZRANGE', c.ready, 0, 0, 'WITHSCORES')[2]) or false
  end
  return shard.best or nil
end

-- Into the shard's ready index unless an operator paused the account or a poison event
-- parked it (it is not claimed then). Returns whether it went in.
local function make_ready(c, account, order, rand, backlog)
  if redis.call('HEXISTS', c.paused, account) == 1 then return false end
  local score = ready_score(c.pending, order, rand, backlog)
  add_ready(c.ready, {score, account}, order)
  local best = c.shard.best
  if best ~= nil and (not best or tonumber(score) < best) then c.shard.best = tonumber(score) end
  return true
end

-- Nothing left to do and no owner: out of the active set, and its state starts to age
-- (a claim keeps it again: the state is made persistent).
local function drained(c, account)
  redis.call('SREM', c.active, account)
  redis.call('PEXPIRE', c.seq_key, ACCOUNT_IDLE_MS)
  redis.call('PEXPIRE', c.state, ACCOUNT_IDLE_MS)
end

-- A batch left in flight by an owner that died goes back to the head, first in line; more
-- than one event, and they are handed out one at a time (`redo`). `size`: the state's, when
-- the caller read it (0 or false: nothing is in flight). Returns how many went back.
local function recover(c, size)
  if size == nil then size = redis.call('HGET', c.state, 'size') end
  local count = tonumber(size) or 0
  if count == 0 then return 0 end
  back_to_head(c)
  redis.call('HINCRBY', c.stats, 'redelivered', count)
  if count > 1 then redis.call('HSET', c.state, 'redo', count) end
  return count
end

-- An account with work, no owner and no ready entry (its owner died, or a claimer lost the
-- reply of its pop) goes back into the ready index. Returns 1 when it did.
local function reready(c, account, order, rand)
  if redis.call('EXISTS', c.lock) == 1 or redis.call('ZSCORE', c.ready, account) then
    return 0
  end
  recover(c)
  flush(c)
  local backlog = redis.call('LLEN', c.pending)
  if backlog == 0 then
    drained(c, account)
    return 0
  end
  return make_ready(c, account, order, rand, backlog) and 1 or 0
end

-- Put up to `k` events of the head in flight for `token` (and, from a claim, record the claim
-- id); nil when there are none, or when the account is paused (the caller releases it).
-- `n`, `redo` and `held_back` (paused): the state's as the caller knows them, or nil to read.
local function take_head(c, token, claim, k, n, redo, held_back)
  if n == nil then
    local read = redis.call('HMGET', c.state, 'n', 'redo', 'paused')
    n, redo, held_back = tonumber(read[1]) or 0, tonumber(read[2]) or 0, read[3] == '1'
  end
  if held_back then return nil end
  if redo > 0 then k = 1 end
  local bodies = redis.call('LRANGE', c.pending, 0, k - 1)
  if #bodies == 0 then return nil end
  local attempt = n + 1
  stage(c, 'n', attempt)
  stage(c, 'token', token)
  stage(c, 'size', #bodies)
  stage(c, 'seq', string.match(bodies[1], '^{"seq":(%d+)'))
  if claim then stage(c, 'claim', claim) end
  return handed(bodies, attempt)
end

-- Give the account up: back into the ready index while it has work, else out of the active set.
-- `backlog`: the pending list's length when the caller knows that nothing is in flight.
local function release(c, account, order, rand, backlog)
  if not backlog then
    back_to_head(c)
    backlog = redis.call('LLEN', c.pending)
  end
  redis.call('DEL', c.lock)
  if backlog > 0 then
    make_ready(c, account, order, rand, backlog)
    return {'released'}
  end
  drained(c, account)
  return {'drained'}
end

-- After a batch is settled: take the next (up to `k` events) while this account is still the
-- best choice, otherwise put it back. The best waiting account, in this shard or in the
-- consumer's latest view of the others (`elsewhere`, a ready score, or '' for none), must beat
-- this one's score by `margin`.
-- It runs once the batch before is settled: nothing is in flight, `n` and `redo` are the new
-- head's (drop_settled) and `held_back` whether the account is paused.
local function next_step(c, s, p, n, redo, held_back)
  local backlog = redis.call('LLEN', c.pending)
  if s.want_next ~= '1' or backlog == 0 then
    return release(c, s.account, p.order, s.rand, backlog)
  end
  if p.order ~= 'random' then
    local best = best_ready(c)
    local other = tonumber(p.elsewhere)
    if other and (not best or other < best) then best = other end
    local own = tonumber(ready_score(c.pending, p.order, s.rand, backlog))
    if best and best <= own - tonumber(p.margin) then
      return release(c, s.account, p.order, s.rand, backlog)
    end
  end
  return take_head(c, s.token, nil, s.k, n, redo, held_back)
    or release(c, s.account, p.order, s.rand, backlog)
end

-- Keep `reply` as the answer to this token's call `op` about (seq, attempt), and return it.
local function remember(c, token, seq, attempt, op, reply)
  stage(c, 't:' .. token, seq .. ':' .. attempt .. ':' .. op .. ':' .. reply[1])
  return reply
end

-- The answer to a call this token already made, or nil when it is a new call. An event handed
-- out then and still held is handed out again; one held no longer is {'released'}: the call
-- landed, the account is no longer this token's.
local function replayed(c, token, seq, attempt, op)
  local last = redis.call('HGET', c.state, 't:' .. token)
  if not last then return nil end
  local s, a, o, reply = string.match(last, '^(%d+):(%d+):(%a+):(%a+)$')
  if s ~= seq or a ~= attempt or o ~= op then return nil end
  if reply ~= 'event' then return {reply} end
  return (owns(c, token) and held_by(c, token)) or {'released'}
end

-- At a claim: count the new owner's token among those with a call kept (`calls`, the state's),
-- and once there are KEEP_CALLS, keep the calls of the newest KEEP_CALLS - 1 tokens only.
local function forget_old_calls(c, calls)
  calls = tonumber(calls) or 0
  if calls < KEEP_CALLS then
    stage(c, 'calls', calls + 1)
    return
  end
  local tokens = {}
  for _, field in ipairs(redis.call('HKEYS', c.state)) do
    local token = string.match(field, '^t:(%d+)$')
    if token then tokens[#tokens + 1] = {tonumber(token), field} end
  end
  table.sort(tokens, function(a, b) return a[1] < b[1] end)
  local drop = #tokens - KEEP_CALLS + 1
  for i = 1, drop do redis.call('HDEL', c.state, tokens[i][2]) end
  stage(c, 'calls', #tokens - math.max(drop, 0) + 1)
end

-- The first `count` events in flight are settled: they leave the head. The rest of the batch
-- never ran and is first in line again, uncounted. Then nothing is in flight, and the new head
-- has had no attempt, unless it is one of a dead owner's batch (`redo` > 1): one then.
-- Returns the head's n and redo, as staged.
local function drop_settled(c, count, redo)
  redis.call('LTRIM', c.pending, count, -1)
  back_to_head(c)
  if redo == 0 then
    stage(c, 'n', 0)
    return 0, 0
  end
  redo = redo - 1
  stage(c, 'n', redo > 0 and 1 or 0)
  stage(c, 'redo', redo)
  return redo > 0 and 1 or 0, redo
end

-- A settle as settle.lua names it (`s`): the account, the owner's token, the seq and attempt
-- of the first event of its batch in flight, how many of its events from the first were
-- handled (`count`; for a nack, before the one that failed), the last of those
-- events' seq, what the owner wants next (`want_next` '1' or '0'; `k`, the most events to hand
-- out) and its random score (`rand`, claim order random). The call's policy (`p`): the claim
-- order, the switch margin, the best ready score elsewhere, the dead letters the shard keeps
-- and whether a dead-lettered event parks its account.

-- ack: the first `count` events of the batch were handled; drop them and decide what the slot
-- does next (the events after them, if any, go back first).
-- Returns {'event', body, attempt, more bodies...} (the next batch, still owned),
-- {'released'}, {'drained'} or {'lost'} (not acked: the lease is gone, nothing changed), and
-- how many it acked now (the caller adds them to the shard's count). Sent again: the same
-- answer, not acked again.
local function ack(c, s, p)
  local held, redo, acked, _, held_back = holds(c, s.token, s.seq, s.attempt)
  if not held then
    return replayed(c, s.token, s.seq, s.attempt, 'ack') or {'lost'}, 0
  end
  local n
  n, redo = drop_settled(c, s.count, redo)
  stage(c, 'acked', acked + s.count)
  stage(c, 'last_acked_seq', s.last_seq)
  local reply = next_step(c, s, p, n, redo, held_back)
  return remember(c, s.token, s.seq, s.attempt, 'ack', reply), s.count
end

-- nack: the first `count` events of the batch were handled (acked here), the next one failed;
-- retry it in place, or dead-letter it (`entry`, its JSON; '' to retry) and go on. The events
-- after it never ran and go back to the head uncounted. The shard keeps `dead_max` dead
-- letters (the oldest go first); `park` '1' pauses the account with its dead-lettered event
-- (POISON_POLICY=park) until an operator replays the event or resumes the account.
-- Returns {'retry'} (back at the head, still owned), a next step as ack does, or {'lost'},
-- how many it acked now, and whether it settled the failed event now (the caller adds them to
-- the shard's counts). Sent again: the same answer, nothing changed.
local function nack(c, s, p)
  local held, redo, acked, dead_count, held_back = holds(c, s.token, s.seq, s.attempt)
  if not held then
    return replayed(c, s.token, s.seq, s.attempt, 'nack') or {'lost'}, 0, false
  end
  local reply
  if s.count > 0 then
    redis.call('LTRIM', c.pending, s.count, -1)
    stage(c, 'acked', acked + s.count)
    stage(c, 'last_acked_seq', s.last_seq)
  end
  if s.entry == '' then
    -- the failed event is the new first of the batch: its attempt is counted
    if s.count > 0 then stage(c, 'n', 1) end
    back_to_head(c)
    reply = {'retry'}
    if s.want_next ~= '1' then reply = release(c, s.account, p.order, s.rand) end
  else
    local id = s.account .. ':' .. s.event_id
    redis.call('HSET', c.dead, id, s.entry)
    redis.call('ZADD', c.dead_order, redis.call('HINCRBY', c.stats, 'dead', 1), id)
    local over = redis.call('ZCARD', c.dead_order) - tonumber(p.dead_max)
    if over > 0 then
      local dropped = redis.call('ZPOPMIN', c.dead_order, over)
      for i = 1, #dropped, 2 do redis.call('HDEL', c.dead, dropped[i]) end
    end
    local n
    n, redo = drop_settled(c, 1, redo)
    stage(c, 'dead', dead_count + 1)
    if p.park == '1' then
      redis.call('HSET', c.paused, s.account, 'parked')
      stage(c, 'paused', '1')
      held_back = true
    end
    reply = next_step(c, s, p, n, redo, held_back)
  end
  return remember(c, s.token, s.seq, s.attempt, 'nack', reply), s.count, true
end
