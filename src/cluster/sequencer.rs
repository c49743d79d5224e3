//! The cluster's sequencer: every command decided by one Lua script in Redis, exactly as the
//! hub decides it on one node, and recorded as one entry of the log (docs/cluster.md,
//! section 1). Nothing here is wired into the server yet.
//!
//! **What a script decides.** The checks and the state the hub keeps for them: whether the
//! session exists, its command rate (a token bucket), the rooms it is in (in join order, at
//! most `max_rooms_per_session`), the rooms its identity lets it join, its retry table (the
//! last `dedup_window` sends by `client_id`), each room's message rate, and message ids. A
//! `send` takes its id with `INCR` and adds the message to the room's history (the sorted set
//! the Redis history store reads, trimmed to `history_len` and expiring `history_max_age`
//! after its newest message) in the same script that appends its entry, so history and log
//! never disagree. The time is Redis's (`TIME`), so every node gives a message the same `ts`.
//!
//! **What stays on the node.** What only one node's memory decides (`server_full`,
//! `shutting_down`), verifying tokens (a `refresh` hands the script a verified identity), and
//! everything about transports.
//!
//! **Entries.** A command that changes what some session sees appends exactly one entry
//! ([`Record`]); a refused one appends none, and its reply carries the error (a node pushes
//! the `error` event of a command that came on a stream as an entry of its own).
//!
//! **Keys**, all under `switchyard:c:` but for the room's history: `session:ID` (a hash: name,
//! user, rules), `session:ID:rooms` (a list), `session:ID:bucket`, `session:ID:sent` (`client_id`
//! to the message's JSON), `session:ID:sent:order` (a list), `room:NAME:bucket` and `ids`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use serde::Deserialize;

use super::log::{LogId, LAST, LOG};
use crate::hub::refusal;
use crate::hub::{CommandResult, HubConfig, Identity};
use crate::protocol::{Command, ErrorBody, Message, DEFAULT_PAGE};
use crate::store::redis::room_key;

/// Where the sequencer's own keys live.
const PREFIX: &str = "switchyard:c:";
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one script may take to answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait a `rate_limited` refusal names, as on one node.
const MAX_WAIT: Duration = Duration::from_secs(86_400);
/// A bucket's expiry at most, in ms: past it a bucket is as good as refilled.
const MAX_BUCKET_MS: u64 = 1_000_000_000_000;

/// Creates a session: KEYS[1] its hash; ARGV: name, user ('' without a token), the rooms its
/// identity allows as a JSON array ('' for any).
const CREATE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'name', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'user', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'rules', ARGV[3]) end
return 1
";

/// Decides one command. Returns `{'ok', entry id or '', message id, duplicate}` or
/// `{'err', code, detail, wait in microseconds}`.
///
/// KEYS: 1 session, 2 its rooms, 3 its bucket, 4 its sent messages, 5 their order, 6 the
/// room's bucket, 7 the room's history, 8 ids, 9 log, 10 log last.
/// ARGV: 1 kind, 2 session id, 3 room, 4 text | before | user, 5 client_id | limit | rules,
/// 6 session rate/s, 7 session burst, 8 room rate/s ('' for none), 9 room burst,
/// 10 rooms per session, 11 history kept, 12 history max age (ms), 13 retry table size,
/// 14 log retention (ms), 15 bucket expiry cap (ms).
const DECIDE: &str = r#"
local kind, session, room = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(n) return string.format('%d', n) end
local function q(s) return cjson.encode(s) end
local function refuse(code, detail, wait) return {'err', code, detail or '', int(wait or 0)} end
local function ok(entry, id, dup) return {'ok', entry or '', int(id or 0), dup and '1' or '0'} end

local function append(body)
  local prev = redis.call('GET', KEYS[10]) or '0-0'
  local oldest = math.floor(now / 1000) - tonumber(ARGV[14])
  if oldest < 0 then oldest = 0 end
  local id = redis.call('XADD', KEYS[9], 'MINID', int(oldest), '*', 'p', prev, 'e', body)
  redis.call('SET', KEYS[10], id)
  return id
end

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

local function list(items)
  local quoted = {}
  for i, item in ipairs(items) do quoted[i] = q(item) end
  return '[' .. table.concat(quoted, ',') .. ']'
end

if redis.call('EXISTS', KEYS[1]) == 0 then return refuse('unknown_session') end
if kind == 'end' then
  local rooms = redis.call('LRANGE', KEYS[2], 0, -1)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  return ok(append('{"k":"end","s":' .. q(session) .. ',"rooms":' .. list(rooms) .. '}'))
end
local wait = take(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
if wait > 0 then return refuse('rate_limited', 'session', wait) end

if kind == 'refresh' then
  local user = redis.call('HGET', KEYS[1], 'user')
  if not user then return refuse('forbidden', 'no_token') end
  if user ~= ARGV[4] then return refuse('forbidden', 'other_user') end
  if ARGV[5] == '' then redis.call('HDEL', KEYS[1], 'rules')
  else redis.call('HSET', KEYS[1], 'rules', ARGV[5]) end
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
  return ok(append('{"k":"join","s":' .. q(session) .. ',"r":' .. q(room) .. ',"ts":' .. int(now) .. '}'))
end
if not joined then return refuse('not_in_room') end

if kind == 'leave' or kind == 'typing' then
  if kind == 'leave' then redis.call('LREM', KEYS[2], 0, room) end
  return ok(append('{"k":"' .. kind .. '","s":' .. q(session) .. ',"r":' .. q(room) .. '}'))
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
  return ok(append('{"k":"page","s":' .. q(session) .. ',"r":' .. q(room) .. ',"before":' .. before
    .. ',"more":' .. tostring(more) .. ',"m":[' .. table.concat(kept, ',') .. ']}'))
end

-- send
local client_id = ARGV[5]
local earlier = redis.call('HGET', KEYS[4], client_id)
if earlier then
  local id = cjson.decode(earlier).id
  return ok(append('{"k":"retry","s":' .. q(session) .. ',"m":' .. earlier .. '}'), id, true)
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
return ok(append('{"k":"send","s":' .. q(session) .. ',"m":' .. msg .. '}'), id, false)
"#;

/// What a log entry written by the sequencer says (its body, field `e`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Record {
    /// A message accepted into its room: its members get it.
    Send {
        /// The sender.
        #[serde(rename = "s")]
        session: String,
        /// The message, as its room's history holds it.
        #[serde(rename = "m")]
        message: Message,
    },
    /// A send retried with a `client_id` already sent: the sender gets the original again.
    Retry {
        /// The sender.
        #[serde(rename = "s")]
        session: String,
        /// The original message.
        #[serde(rename = "m")]
        message: Message,
    },
    /// A session joins a room (or, already in it, asks for a fresh view).
    Join {
        /// Who joins.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// When, on Redis's clock (µs): the joiner's `history` covers messages younger than
        /// the room's max age at this time.
        ts: u64,
    },
    /// A session leaves a room.
    Leave {
        /// Who leaves.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
    },
    /// A member is typing.
    Typing {
        /// Who types.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
    },
    /// A page of a room's history, for the session that asked.
    Page {
        /// Who asked.
        #[serde(rename = "s")]
        session: String,
        /// The room.
        #[serde(rename = "r")]
        room: String,
        /// The `before` it asked with.
        before: Option<u64>,
        /// Whether older messages are left.
        more: bool,
        /// The messages, oldest first.
        #[serde(rename = "m")]
        messages: Vec<Message>,
    },
    /// A session ended: it left these rooms.
    End {
        /// The session.
        #[serde(rename = "s")]
        session: String,
        /// The rooms it was in.
        rooms: Vec<String>,
    },
}

impl Record {
    /// Reads an entry's body.
    pub fn parse(body: &str) -> Result<Record, String> {
        serde_json::from_str(body).map_err(|e| format!("a log entry that is not one ({e}): {body}"))
    }
}

/// What the sequencer decided for one command.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The command's result, as `/commands` replies it.
    pub result: CommandResult,
    /// The entry it appended, if it changed what some session sees.
    pub entry: Option<LogId>,
}

/// Redis could not be reached, or answered what no script returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cluster's Redis: {0}")]
pub struct Unavailable(pub String);

impl From<redis::RedisError> for Unavailable {
    fn from(error: redis::RedisError) -> Self {
        Unavailable(error.to_string())
    }
}

/// Decides commands in Redis. Cheap to clone: clones share one multiplexed connection, which
/// reconnects by itself.
#[derive(Clone)]
pub struct Sequencer {
    conn: ConnectionManager,
    config: HubConfig,
    create: Script,
    decide: Script,
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer").finish_non_exhaustive()
    }
}

fn session_key(session: &str, part: &str) -> String {
    format!("{PREFIX}session:{session}{part}")
}

/// The rooms an identity allows, as the scripts read them: a JSON array, '' for any.
fn rules(identity: Option<&Identity>) -> String {
    identity
        .and_then(|i| i.rooms.as_deref())
        .map(|rooms| serde_json::to_string(rooms).expect("strings serialize"))
        .unwrap_or_default()
}

/// A rate as the scripts read it: finite, above zero.
fn rate(per_sec: f64) -> String {
    format!("{:e}", per_sec.clamp(1e-12, 1e12))
}

impl Sequencer {
    /// Connects to the Redis at `url`, deciding by the limits of `config`.
    pub async fn connect(url: &str, config: &HubConfig) -> Result<Sequencer, Unavailable> {
        let client = Client::open(url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, manager).await?;
        Ok(Sequencer {
            conn,
            config: config.clone(),
            create: Script::new(CREATE),
            decide: Script::new(DECIDE),
        })
    }

    /// Creates session `session` for `name`, with the rooms `identity` allows.
    pub async fn create(
        &self,
        session: &str,
        name: &str,
        identity: Option<&Identity>,
    ) -> Result<(), Unavailable> {
        let mut conn = self.conn.clone();
        self.create
            .key(session_key(session, ""))
            .arg(name)
            .arg(identity.map(|i| &*i.user).unwrap_or_default())
            .arg(rules(identity))
            .invoke_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Decides one command of `session`.
    pub async fn execute(&self, session: &str, command: &Command) -> Result<Decision, Unavailable> {
        let (kind, room, first, second) = match command {
            Command::Join { room } => ("join", room.as_str(), String::new(), String::new()),
            Command::Leave { room } => ("leave", room.as_str(), String::new(), String::new()),
            Command::Typing { room } => ("typing", room.as_str(), String::new(), String::new()),
            Command::Send {
                room,
                text,
                client_id,
            } => ("send", room.as_str(), text.clone(), client_id.clone()),
            Command::History {
                room,
                before,
                limit,
            } => (
                "history",
                room.as_str(),
                before.map(|b| b.to_string()).unwrap_or_default(),
                limit.unwrap_or(DEFAULT_PAGE).to_string(),
            ),
            Command::Refresh { .. } => {
                return Err(Unavailable(
                    "a refresh is decided by Sequencer::refresh, with the verified identity".into(),
                ))
            }
        };
        self.run(kind, session, room, first, second).await
    }

    /// Gives `session` the rooms of a verified `identity` (`refresh`); refused if the session
    /// was created without a token or for another user.
    pub async fn refresh(
        &self,
        session: &str,
        identity: &Identity,
    ) -> Result<Decision, Unavailable> {
        let user = identity.user.to_string();
        self.run("refresh", session, "", user, rules(Some(identity)))
            .await
    }

    /// Ends `session`: it leaves its rooms, and its state is gone.
    pub async fn end(&self, session: &str) -> Result<Decision, Unavailable> {
        self.run("end", session, "", String::new(), String::new())
            .await
    }

    async fn run(
        &self,
        kind: &str,
        session: &str,
        room: &str,
        first: String,
        second: String,
    ) -> Result<Decision, Unavailable> {
        let config = &self.config;
        let (room_rate, room_burst) = match config.room_rate_limit {
            Some((per_sec, burst)) => (rate(per_sec), burst.to_string()),
            None => (String::new(), String::new()),
        };
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .decide
            .key(session_key(session, ""))
            .key(session_key(session, ":rooms"))
            .key(session_key(session, ":bucket"))
            .key(session_key(session, ":sent"))
            .key(session_key(session, ":sent:order"))
            .key(format!("{PREFIX}room:{room}:bucket"))
            .key(room_key(room))
            .key(format!("{PREFIX}ids"))
            .key(LOG)
            .key(LAST)
            .arg(kind)
            .arg(session)
            .arg(room)
            .arg(first)
            .arg(second)
            .arg(rate(config.rate_limit_per_sec))
            .arg(config.rate_limit_burst)
            .arg(room_rate)
            .arg(room_burst)
            .arg(config.max_rooms_per_session)
            .arg(config.history_len)
            .arg(config.history_max_age.as_millis().min(u64::MAX as u128) as u64)
            .arg(config.dedup_window)
            .arg(self.retention().as_millis() as u64)
            .arg(MAX_BUCKET_MS)
            .invoke_async(&mut conn)
            .await?;
        self.decision(session, room, &reply)
            .ok_or_else(|| Unavailable(format!("a script answered {reply:?}")))
    }

    /// How long the log keeps entries: long enough for a node to rebuild a session that
    /// resumes within its TTL (docs/cluster.md, section 5).
    fn retention(&self) -> Duration {
        self.config.session_ttl + Duration::from_secs(60)
    }

    /// Reads a script's reply; `None` if it is not one.
    fn decision(&self, session: &str, room: &str, reply: &[String]) -> Option<Decision> {
        match reply {
            [status, entry, id, duplicate] if status == "ok" => {
                let id: u64 = id.parse().ok()?;
                let result = if id > 0 {
                    CommandResult::sent(id, duplicate == "1")
                } else {
                    CommandResult::done()
                };
                let entry = match entry.as_str() {
                    "" => None,
                    entry => Some(entry.parse().ok()?),
                };
                Some(Decision { result, entry })
            }
            [status, code, detail, wait] if status == "err" => {
                let wait = Duration::from_micros(wait.parse().ok()?).min(MAX_WAIT);
                let error = self.refusal(code, detail, session, room, wait)?;
                Some(Decision {
                    result: CommandResult::failed(error),
                    entry: None,
                })
            }
            _ => None,
        }
    }

    /// The error a script's refusal stands for, worded as the hub words it.
    fn refusal(
        &self,
        code: &str,
        detail: &str,
        session: &str,
        room: &str,
        wait: Duration,
    ) -> Option<ErrorBody> {
        let config = &self.config;
        Some(match (code, detail) {
            ("unknown_session", _) => refusal::unknown_session(session),
            ("rate_limited", "session") => refusal::session_rate_limited(config, wait),
            ("rate_limited", "room") => refusal::room_rate_limited(room, config, wait),
            ("forbidden", "no_token") => refusal::refresh_without_token(),
            ("forbidden", "other_user") => refusal::refresh_for_another_user(),
            ("forbidden", "room") => refusal::room_forbidden(room),
            ("too_many_rooms", _) => refusal::too_many_rooms(config),
            ("not_in_room", _) => refusal::not_in_room(room),
            _ => return None,
        })
    }
}
