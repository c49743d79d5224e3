-- The nodes of a cluster (src/cluster/sequencer.rs): each running node beats every few
-- seconds into a sorted set (KEYS[3], score: ms on Redis's clock), and a starting node checks
-- that it can read the log from its start.
--
-- KEYS: 1 log, 2 log last, 3 the nodes. ARGV: 1 kind ('beat': this node runs; 'leave': it
-- stopped; 'start'), 2 node, 3 how long a beat counts (ms), 4 the prefix of every key of the
-- cluster's sessions.
-- Returns {'ok'} (beat, leave) or, for start: {'whole'} if the log holds its first entry (a
-- node reads it all), {'reset'} if it was trimmed and no other node is running (nobody holds
-- the sessions it built: they end, and a new log starts; room history and message ids are
-- kept), or {'live', NODE} if it was trimmed while NODE runs (this node cannot rebuild what
-- NODE holds).
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind, node = ARGV[1], ARGV[2]

if kind == 'leave' then
  redis.call('ZREM', KEYS[3], node)
  return {'ok'}
end
if kind == 'beat' then
  redis.call('ZADD', KEYS[3], string.format('%d', ms), node)
  return {'ok'}
end

local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
-- An entry's fields: 'p', its predecessor, 'e', its body.
if first == nil or first[2][2] == '0-0' then
  redis.call('ZADD', KEYS[3], string.format('%d', ms), node)
  return {'whole'}
end
local live = redis.call('ZRANGEBYSCORE', KEYS[3], string.format('%d', ms - tonumber(ARGV[3])), '+inf')
for _, other in ipairs(live) do
  if other ~= node then return {'live', other} end
end
for _, key in ipairs(redis.call('KEYS', ARGV[4] .. '*')) do
  redis.call('DEL', key)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZADD', KEYS[3], string.format('%d', ms), node)
return {'reset'}
