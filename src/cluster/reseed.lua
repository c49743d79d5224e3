-- Restores a cluster's state after Redis lost it, or came back with an older copy of it
-- (src/cluster/sequencer.rs, docs/cluster.md section 5). Every running node still holds
-- every session and room; they elect the one
-- that applied the most of the lost log, which writes back what the scripts decide by and
-- starts a new log with a `reseed` entry: every node then takes that node's snapshot, and
-- every session gets a `reset`.
--
-- KEYS: 1 the cluster's mark (prelude.lua), 2 the offers (a hash: node to the last entry of
-- the lost log it applied), 3 when the first offer came (ms), 4 the elected node (a lease),
-- 5 the running nodes' beats (membership.lua), 6 log, 7 log last, 8 deadlines, 9 message ids.
-- ARGV: 1 kind, 2 node, then by kind:
--   forget: 3 when (ms) the node's last entry read was appended
--   offer:  3 the node's position in the lost log, 4 how long (ms) the election waits at
--           least after the first offer, 5 at most for a running node to offer, 6 how long
--           a beat counts (ms), 7 how long (ms) the elected node has to restore the state
--   commit: 3 the state (JSON: `ids`, the newest message id; `sessions`, each with `id`,
--           `name`, and maybe `user`, `rules` (a JSON array), `token_exp` (ms) and `rooms`;
--           `rooms`, each with its history's `key` and `messages`, [id, JSON] pairs), 4 the
--           key of the snapshot the other nodes take, 5 log retention (ms), 6 the key prefix
--           of sessions, 7 how long (ms) from now a session falls idle (lease and TTL: its
--           transport, if still attached somewhere, takes its lease again), 8 history max age
--           (ms)
-- Returns, for forget: {'ok'}; else {'restored'} once the mark is back, or for offer:
-- {'wait'} or {'elected', NODE}; for commit: {'ok', the `reseed` entry's id} or
-- {'err', 'not_elected'}.
local kind, node = ARGV[1], ARGV[2]
if kind == 'forget' then
  -- A node found the log behind what it applied (Redis came back with an older copy): the
  -- state Redis holds is older too, and nothing may be decided on it. The mark goes, unless
  -- it was set after the last entry the node had read (ARGV[3], ms): the state was restored
  -- (or a cluster started anew) since.
  local set = tonumber(redis.call('GET', KEYS[1]))
  if set and set <= tonumber(ARGV[3]) then redis.call('DEL', KEYS[1]) end
  return {'ok'}
end
if not lost(KEYS[1]) then return {'restored'} end

-- A position `MS-SEQ` as two numbers.
local function position(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

if kind == 'offer' then
  redis.call('HSET', KEYS[2], node, ARGV[3])
  local since = tonumber(redis.call('GET', KEYS[3]))
  if not since then
    since = ms
    redis.call('SET', KEYS[3], int(ms))
  end
  local elected = redis.call('GET', KEYS[4])
  if elected then return {'elected', elected} end
  local waited = ms - since
  if waited < tonumber(ARGV[4]) then return {'wait'} end
  local live = redis.call('ZRANGEBYSCORE', KEYS[5], int(ms - tonumber(ARGV[6])), '+inf')
  if waited < tonumber(ARGV[5]) then
    for _, other in ipairs(live) do
      if redis.call('HEXISTS', KEYS[2], other) == 0 then return {'wait'} end
    end
  end
  -- The running node that applied the most (a node that offered and then died is passed
  -- over: its lease ran out before it restored anything); ties by name.
  local running = {}
  for _, other in ipairs(live) do running[other] = true end
  local offers = redis.call('HGETALL', KEYS[2])
  local best, best_ms, best_seq
  for i = 1, #offers, 2 do
    local name = offers[i]
    local at_ms, at_seq = position(offers[i + 1])
    local better = best == nil or at_ms > best_ms
      or (at_ms == best_ms and (at_seq > best_seq or (at_seq == best_seq and name < best)))
    if (running[name] or #live == 0) and better then
      best, best_ms, best_seq = name, at_ms, at_seq
    end
  end
  if best == nil then return {'wait'} end
  redis.call('SET', KEYS[4], best, 'PX', ARGV[7])
  return {'elected', best}
end

-- commit
if redis.call('GET', KEYS[4]) ~= node then return {'err', 'not_elected'} end
-- What Redis may still hold (an older copy of the state, and of the log) goes: the elected
-- node's state replaces it, and the new log starts with nothing before it.
for _, key in ipairs(redis.call('KEYS', ARGV[6] .. '*')) do redis.call('DEL', key) end
redis.call('DEL', KEYS[8], KEYS[6], KEYS[7])
local state = cjson.decode(ARGV[3])
for _, s in ipairs(state.sessions) do
  local key = ARGV[6] .. s.id
  redis.call('DEL', key, key .. ':rooms')
  redis.call('HSET', key, 'name', s.name)
  if s.user then redis.call('HSET', key, 'user', s.user) end
  if s.rules then redis.call('HSET', key, 'rules', s.rules) end
  if s.token_exp then redis.call('HSET', key, 'token_exp', int(s.token_exp)) end
  for _, room in ipairs(s.rooms) do redis.call('RPUSH', key .. ':rooms', room) end
  schedule(KEYS[8], key, s.id, ms + tonumber(ARGV[7]))
end
for _, room in ipairs(state.rooms) do
  for _, m in ipairs(room.messages) do redis.call('ZADD', room.key, int(m[1]), m[2]) end
  if #room.messages > 0 then redis.call('PEXPIRE', room.key, ARGV[8]) end
end
if state.ids > tonumber(redis.call('GET', KEYS[9]) or '0') then
  redis.call('SET', KEYS[9], int(state.ids))
end
redis.call('SET', KEYS[1], int(ms))
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return {'ok', append(KEYS[6], KEYS[7], ARGV[5], '{"k":"reseed","node":' .. q(node) .. ',"key":'
  .. q(ARGV[4]) .. ',"ts":' .. int(now) .. '}')}
