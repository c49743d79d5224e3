-- A session's life in the cluster (src/cluster/sequencer.rs): its creation, its transports
-- (one at a time, one poll at a time, each holding an attach lease its node renews), and its
-- end when idle past its TTL or when its token expires.
--
-- A session's deadline (its score in the sorted set KEYS[3], ms on Redis's clock) is the
-- earlier of its token's expiry and when it falls idle: its TTL after the last detach or
-- after its attach lease lapses. A node that dies stops renewing its leases, so its sessions
-- fall due a lease and a TTL after its last renewal.
--
-- KEYS: 1 session, 2 its attach lease, 3 deadlines, 4 log, 5 log last, 6 the running nodes'
-- beats (membership.lua), 7 the cluster's mark (prelude.lua).
-- ARGV: 1 kind, 2 session id, 3 lease (ms), 4 TTL (ms), 5 log retention (ms), 6 the key
-- prefix of sessions, 7 the most sessions one sweep ends, then by kind:
--   create:         8 name, 9 user ('' without a token), 10 rules ('' for any room),
--                   11 token expiry (ms, '' for none)
--   attach:         8 node, 9 attachment, 10 the transport's kind (its wire name),
--                   11 a poll's resume point ('' for a stream), 12 how long (ms) a node
--                   that stopped beating still counts as holding its polls
--   renew:          8 attachment, 9 node, 10 the transport's kind, 11 'retake' to take a
--                   lapsed lease again (else a lapsed lease answers {'err', 'lapsed'})
--   detach:         8 attachment
--   tick:           8 node; KEYS[1] is then the ticker's lease
-- Returns {'ok', entry id or ''} (attach: the log's newest entry id), {'err', code} (for
-- poll_in_progress, and the attachment holding the lease), or (expire) the sessions ended.
local kind, session = ARGV[1], ARGV[2]
local lease_ms, ttl, retention = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
if lost(KEYS[7]) then return redis.error_reply(LOST) end

if kind == 'create' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'name', ARGV[8])
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'user', ARGV[9]) end
  if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'rules', ARGV[10]) end
  if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'token_exp', ARGV[11]) end
  schedule(KEYS[3], KEYS[1], session, ms + ttl)
  -- Every node keeps every session (its seq and recent events), from this entry on.
  local function opt(v, raw) if v == '' then return 'null' elseif raw then return v else return q(v) end end
  return {'ok', append(KEYS[4], KEYS[5], retention, '{"k":"create","s":' .. q(session) .. ',"name":'
    .. q(ARGV[8]) .. ',"user":' .. opt(ARGV[9]) .. ',"rules":' .. opt(ARGV[10], true)
    .. ',"expires":' .. opt(ARGV[11], true) .. '}')}
end

if kind == 'expire' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', int(ms), 'LIMIT', 0, tonumber(ARGV[7]))
  for _, id in ipairs(due) do
    local key = ARGV[6] .. id
    local rooms = redis.call('LRANGE', key .. ':rooms', 0, -1)
    local token = tonumber(redis.call('HGET', key, 'token_exp'))
    local why = 'idle'
    if token and token <= ms then why = 'token_expired' end
    redis.call('DEL', key, key .. ':rooms', key .. ':bucket', key .. ':sent', key .. ':sent:order',
      key .. ':attach')
    redis.call('ZREM', KEYS[3], id)
    append(KEYS[4], KEYS[5], retention, '{"k":"end","s":' .. q(id) .. ',"why":"' .. why
      .. '","rooms":' .. list(rooms) .. ',"ts":' .. int(now) .. '}')
  end
  return due
end

-- One node at a time holds the ticker and appends the flushes that turn pending presence
-- and typing changes into events, the same on every replica.
if kind == 'tick' then
  local holder = redis.call('GET', KEYS[1])
  if holder and holder ~= ARGV[8] then return {'err', 'not_ticker'} end
  redis.call('SET', KEYS[1], ARGV[8], 'PX', int(lease_ms))
  return {'ok', append(KEYS[4], KEYS[5], retention, '{"k":"flush","ts":' .. int(now) .. '}')}
end

if redis.call('EXISTS', KEYS[1]) == 0 then return {'err', 'unknown_session'} end
local lease = redis.call('HMGET', KEYS[2], 'node', 'attachment', 'kind')
local held = lease[1] ~= false
local function is_poll(kind) return kind == 'long-polling' or kind == 'short-polling' end

if kind == 'attach' then
  -- A poll held while another asks: the second is refused, unless it resumes past the held
  -- one's resume point. Only that poll's reply can have told the client of later seqs, so
  -- it has ended: its node leaves a poll that handed out events its lease (saving a script
  -- per poll) for the next poll to take here, or to lapse. Should it still run after all,
  -- its node learns at its next renewal that the lease went to another attachment.
  -- A poll held by a node that stopped beating (it died) is not waited for either: its lease
  -- would block the session's polls until it lapses. (A node with no beat at all is taken
  -- as running: only a node that beat and then stopped is judged dead.)
  local polls = held and is_poll(lease[3]) and is_poll(ARGV[10])
  if polls then
    local before = tonumber(redis.call('HGET', KEYS[2], 'after'))
    local after = tonumber(ARGV[11])
    local beat = tonumber(redis.call('ZSCORE', KEYS[6], lease[1]))
    local dead = beat ~= nil and beat < ms - tonumber(ARGV[12])
    if not (before and after and after > before) and not dead then
      return {'err', 'poll_in_progress', lease[2]}
    end
  end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'node', ARGV[8], 'attachment', ARGV[9], 'kind', ARGV[10])
  if ARGV[11] ~= '' then redis.call('HSET', KEYS[2], 'after', ARGV[11]) end
  redis.call('PEXPIRE', KEYS[2], int(lease_ms))
  schedule(KEYS[3], KEYS[1], session, ms + lease_ms + ttl)
  if held and not polls then
    -- The node holding the transport this one supersedes closes it when it reads the entry.
    append(KEYS[4], KEYS[5], retention, '{"k":"attach","s":' .. q(session)
      .. ',"node":' .. q(ARGV[8]) .. ',"attachment":' .. q(ARGV[9])
      .. ',"superseded":' .. q(lease[2]) .. '}')
  end
  -- The log's newest entry: the attaching node applies everything up to it first, so the
  -- session's seqs there are as current as on the node the client came from.
  return {'ok', redis.call('GET', KEYS[5]) or ''}
end

-- A lease that lapsed (its node could not renew it while Redis was away) was taken by no
-- other transport since: its node takes it again if the transport is still attached (a lease
-- given up by a detach is gone too: the node checks the transport before it retakes).
if kind == 'renew' and not held then
  if ARGV[11] ~= 'retake' then return {'err', 'lapsed'} end
  redis.call('HSET', KEYS[2], 'node', ARGV[9], 'attachment', ARGV[8], 'kind', ARGV[10])
end
-- renew and detach: only by the attachment that holds the lease.
if (held and lease[2] ~= ARGV[8]) or (kind == 'detach' and not held) then
  return {'err', 'superseded'}
end
if kind == 'renew' then
  redis.call('PEXPIRE', KEYS[2], int(lease_ms))
  schedule(KEYS[3], KEYS[1], session, ms + lease_ms + ttl)
else
  redis.call('DEL', KEYS[2])
  schedule(KEYS[3], KEYS[1], session, ms + ttl)
end
return {'ok', ''}
