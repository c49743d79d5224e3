-- A send as the cluster's sequencer would decide it (docs/cluster.md section 1), for measuring:
-- KEYS: 1 room members, 2 session's dedupe hash, 3 ids, 4 room history, 5 log, 6 log last,
--       7 session's token bucket
-- ARGV: 1 session, 2 room, 3 client_id, 4 text, 5 name, 6 keep, 7 retention ms, 8 rate/s,
--       9 burst
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return redis.error_reply('not_in_room') end
local dup = redis.call('HGET', KEYS[2], ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local prev = redis.call('GET', KEYS[6]) or '0-0'
local oldest = string.format('%d', math.floor(now / 1000) - tonumber(ARGV[7]))
if dup then
  local eid = redis.call('XADD', KEYS[5], 'MINID', oldest, '*', 'p', prev, 'k', 'retry', 's', ARGV[1], 'id', dup)
  redis.call('SET', KEYS[6], eid)
  return eid
end
local bucket = redis.call('HMGET', KEYS[7], 'tokens', 'at')
local burst = tonumber(ARGV[9])
local tokens = tonumber(bucket[1] or ARGV[9])
local at = tonumber(bucket[2] or now)
tokens = math.min(burst, tokens + (now - at) * tonumber(ARGV[8]) / 1000000)
if tokens < 1 then return redis.error_reply('rate_limited') end
redis.call('HSET', KEYS[7], 'tokens', tokens - 1, 'at', now)
local id = redis.call('INCR', KEYS[3])
local msg = cjson.encode({room = ARGV[2], id = id, from = ARGV[5], text = ARGV[4], ts = now, client_id = ARGV[3]})
redis.call('ZADD', KEYS[4], id, msg)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[6]) + 1))
redis.call('HSET', KEYS[2], ARGV[3], id)
local eid = redis.call('XADD', KEYS[5], 'MINID', oldest, '*', 'p', prev, 'k', 'send', 'e', msg)
redis.call('SET', KEYS[6], eid)
return eid
