-- The nodes of a cluster (src/cluster/sequencer.rs): each running node beats every few
-- seconds into a sorted set (KEYS[3], score: ms on Redis's clock), and a starting node learns
-- how it gets what the running nodes hold.
--
-- KEYS: 1 log, 2 log last, 3 the nodes, 4 the cluster's mark (its state is in Redis;
-- prelude.lua). ARGV: 1 kind ('beat': this node runs; 'leave': it stopped; 'others': which
-- other nodes run; 'start'), 2 node, 3 how long a beat counts (ms), 4 the prefix of every
-- key of the cluster's sessions.
-- Returns {'ok'} (beat, leave), {'join', NODE...} (others: the other nodes running, the most
-- recent beat first) or, for start (which counts the node as running from then on):
-- {'join', NODE...} if other nodes run, the most recent beat first (the node asks one for a
-- snapshot); {'wait'} if they run but Redis lost the cluster's state (they are restoring it,
-- reseed.lua); else {'whole'} if the log holds its first entry (the node reads it all); else
-- {'reset'}: the log's start was trimmed and nobody holds the sessions it built, so they end
-- and a new log starts (room history and message ids are kept).
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

local live = redis.call('ZREVRANGEBYSCORE', KEYS[3], '+inf', string.format('%d', ms - tonumber(ARGV[3])))
local others = {'join'}
for _, other in ipairs(live) do
  if other ~= node then others[#others + 1] = other end
end
if kind == 'others' then return others end
local function running()
  redis.call('ZADD', KEYS[3], string.format('%d', ms), node)
end
if #others > 1 then
  if redis.call('EXISTS', KEYS[4]) == 0 then return {'wait'} end
  running()
  return others
end
-- From here on the cluster's state is this node's to start.
local function mark() redis.call('SET', KEYS[4], string.format('%d', ms)) end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
-- An entry's fields: 'p', its predecessor, 'e', its body. A log restored after Redis lost
-- its data starts with a `reseed`, whose state is in the snapshot of a node no longer
-- running: as good as trimmed.
if first == nil or (first[2][2] == '0-0' and string.sub(first[2][4], 1, 13) ~= '{"k":"reseed"') then
  running()
  mark()
  return {'whole'}
end
for _, key in ipairs(redis.call('KEYS', ARGV[4] .. '*')) do
  redis.call('DEL', key)
end
redis.call('DEL', KEYS[1], KEYS[2])
running()
mark()
return {'reset'}
