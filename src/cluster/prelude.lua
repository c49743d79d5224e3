-- What every sequencer script starts with (src/cluster/sequencer.rs): Redis's clock, and how
-- an entry is appended to the log and a session's deadline is set.
local t = redis.call('TIME')
-- Now, in microseconds and in milliseconds.
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ms = math.floor(now / 1000)
local function int(n) return string.format('%d', n) end
local function q(s) return cjson.encode(s) end

-- A JSON array of strings (cjson would write an empty table as an object).
local function list(items)
  local quoted = {}
  for i, item in ipairs(items) do quoted[i] = q(item) end
  return '[' .. table.concat(quoted, ',') .. ']'
end

-- Appends `body` to the log, chained to the entry before it, trimming entries older than
-- `retention` ms (as src/cluster/log.rs appends); returns the new entry's id.
local function append(log, last, retention, body)
  local prev = redis.call('GET', last) or '0-0'
  local oldest = ms - tonumber(retention)
  if oldest < 0 then oldest = 0 end
  local id = redis.call('XADD', log, 'MINID', int(oldest), '*', 'p', prev, 'e', body)
  redis.call('SET', last, id)
  return id
end

-- Sets when session `id` (its hash at `key`) falls idle, `idle_at` ms, and so its deadline:
-- the earlier of that and its token's expiry.
local function schedule(deadlines, key, id, idle_at)
  redis.call('HSET', key, 'idle_at', int(idle_at))
  local due = idle_at
  local token = tonumber(redis.call('HGET', key, 'token_exp'))
  if token and token < due then due = token end
  redis.call('ZADD', deadlines, int(due), id)
end


-- The error every script but membership's answers once Redis has lost the cluster's state
-- (its mark, `switchyard:c:intact`, is gone with it): the nodes restore it (reseed.lua), and
-- meanwhile nothing may start a new log or decide a command of a session Redis forgot.
local LOST = 'LOST Redis lost the cluster\'s state; the nodes are restoring it'
local function lost(mark) return redis.call('EXISTS', mark) == 0 end
