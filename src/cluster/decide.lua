-- Decides one command of a session, as the hub decides it on one node, and appends its log
-- entry (src/cluster/sequencer.rs says what it keeps and why). Returns
-- {'ok', entry id or '', message id, duplicate} or {'err', code, detail, wait in microseconds}.
--
-- KEYS: 1 session, 2 its rooms, 3 its bucket, 4 its sent messages, 5 their order, 6 the
-- room's bucket, 7 the room's history, 8 ids, 9 log, 10 log last, 11 deadlines, 12 the
-- session's attach lease.
-- ARGV: 1 kind, 2 session id, 3 room, 4 text | before | user, 5 client_id | limit | rules,
-- 6 session rate/s, 7 session burst, 8 room rate/s ('' for none), 9 room burst,
-- 10 rooms per session, 11 history kept, 12 history max age (ms), 13 retry table size,
-- 14 log retention (ms), 15 bucket expiry cap (ms), 16 the token's expiry (refresh; ms).

local kind, session, room = ARGV[1], ARGV[2], ARGV[3]
local function refuse(code, detail, wait) return {'err', code, detail or '', int(wait or 0)} end
local function ok(eid, id, dup) return {'ok', eid or '', int(id or 0), dup and '1' or '0'} end
local function entry(body) return append(KEYS[9], KEYS[10], ARGV[14], body) end

-- Takes a token from the bucket at `key`: 0, or the microseconds until one is there.
local function take(key, per_sec, burst)
  burst = math.max(burst, 1)
  local b = redis.call('HMGET', key, 't', 'at')
  local tokens = tonumber(b[1]) or burst
  local at = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(now - at, 0) * per_sec / 1000000)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / per_sec * 1000000) end
  redis.call('HSET', key, 't', string.format('%.17g', tokens), 'at', int(now))
  -- Refilled to its burst, a bucket is the same as none.
  local ms = math.min(math.ceil((burst - tokens) / per_sec * 1000), tonumber(ARGV[15]))
  redis.call('PEXPIRE', key, int(math.max(ms, 1)))
  return math.min(wait, 86400000000)
end

if lost(KEYS[13]) then return redis.error_reply(LOST) end
if redis.call('EXISTS', KEYS[1]) == 0 then return refuse('unknown_session') end
if kind == 'end' then
  local rooms = redis.call('LRANGE', KEYS[2], 0, -1)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[12])
  redis.call('ZREM', KEYS[11], session)
  return ok(entry('{"k":"end","s":' .. q(session) .. ',"why":"deleted","rooms":' .. list(rooms)
    .. ',"ts":' .. int(now) .. '}'))
end
local wait = take(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
if wait > 0 then return refuse('rate_limited', 'session', wait) end

if kind == 'refresh' then
  local user = redis.call('HGET', KEYS[1], 'user')
  if not user then return refuse('forbidden', 'no_token') end
  if user ~= ARGV[4] then return refuse('forbidden', 'other_user') end
  if ARGV[5] == '' then redis.call('HDEL', KEYS[1], 'rules')
  else redis.call('HSET', KEYS[1], 'rules', ARGV[5]) end
  redis.call('HSET', KEYS[1], 'token_exp', ARGV[16])
  schedule(KEYS[11], KEYS[1], session, tonumber(redis.call('HGET', KEYS[1], 'idle_at')))
  return ok()
end

local joined = redis.call('LPOS', KEYS[2], room) ~= false
if kind == 'join' then
  if not joined then
    local rules = redis.call('HGET', KEYS[1], 'rules')
    if rules then
      local allowed = false
      for _, rule in ipairs(cjson.decode(rules)) do
        if string.sub(rule, -1) == '*' then
          local prefix = string.sub(rule, 1, -2)
          if string.sub(room, 1, #prefix) == prefix then allowed = true end
        elseif rule == room then
          allowed = true
        end
      end
      if not allowed then return refuse('forbidden', 'room') end
    end
    if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[10]) then return refuse('too_many_rooms') end
    redis.call('RPUSH', KEYS[2], room)
  end
  -- With where the room's history stood: a replica that reads it from Redis takes nothing
  -- newer.
  return ok(entry('{"k":"join","s":' .. q(session) .. ',"r":' .. q(room) .. ',"ts":' .. int(now)
    .. ',"last":' .. int(tonumber(redis.call('GET', KEYS[8]) or '0')) .. '}'))
end
if not joined then return refuse('not_in_room') end

if kind == 'leave' then
  redis.call('LREM', KEYS[2], 0, room)
  return ok(entry('{"k":"leave","s":' .. q(session) .. ',"r":' .. q(room) .. ',"ts":' .. int(now)
    .. '}'))
end
if kind == 'typing' then
  return ok(entry('{"k":"typing","s":' .. q(session) .. ',"r":' .. q(room) .. ',"ts":' .. int(now)
    .. '}'))
end

if kind == 'history' then
  local limit = tonumber(ARGV[5])
  local top = '+inf'
  if ARGV[4] ~= '' then top = '(' .. ARGV[4] end
  local rows = redis.call('ZRANGE', KEYS[7], top, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1)
  local oldest = now - tonumber(ARGV[12]) * 1000
  local kept = {}
  for _, json in ipairs(rows) do
    -- Ids grow with time: past the first message too old, all are.
    if cjson.decode(json).ts < oldest then break end
    table.insert(kept, 1, json)
  end
  local more = #kept > limit
  if more then table.remove(kept, 1) end
  local before = 'null'
  if ARGV[4] ~= '' then before = ARGV[4] end
  return ok(entry('{"k":"page","s":' .. q(session) .. ',"r":' .. q(room) .. ',"before":' .. before
    .. ',"more":' .. tostring(more) .. ',"m":[' .. table.concat(kept, ',') .. ']}'))
end

-- send
local client_id = ARGV[5]
local earlier = redis.call('HGET', KEYS[4], client_id)
if earlier then
  local id = cjson.decode(earlier).id
  return ok(entry('{"k":"retry","s":' .. q(session) .. ',"m":' .. earlier .. '}'), id, true)
end
if ARGV[8] ~= '' then
  local room_wait = take(KEYS[6], tonumber(ARGV[8]), tonumber(ARGV[9]))
  if room_wait > 0 then return refuse('rate_limited', 'room', room_wait) end
end
local id = redis.call('INCR', KEYS[8])
local name = redis.call('HGET', KEYS[1], 'name')
local msg = '{"room":' .. q(room) .. ',"id":' .. int(id) .. ',"from":' .. q(name) .. ',"text":'
  .. q(ARGV[4]) .. ',"ts":' .. int(now) .. ',"client_id":' .. q(client_id) .. '}'
redis.call('ZADD', KEYS[7], int(id), msg)
redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -(tonumber(ARGV[11]) + 1))
redis.call('PEXPIRE', KEYS[7], ARGV[12])
redis.call('HSET', KEYS[4], client_id, msg)
redis.call('RPUSH', KEYS[5], client_id)
while redis.call('LLEN', KEYS[5]) > tonumber(ARGV[13]) do
  redis.call('HDEL', KEYS[4], redis.call('LPOP', KEYS[5]))
end
return ok(entry('{"k":"send","s":' .. q(session) .. ',"m":' .. msg .. '}'), id, false)
