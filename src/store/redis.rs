//! Room history in Redis (`--history-store redis://HOST:PORT[/DB]`), written by a thread of
//! its own ([`QueuedStore`]) that stores each batch of queued writes with one script, so a
//! reserved id is in Redis before the hub hands it out. History then lives as long as Redis
//! keeps its data (its `appendonly` and `save` settings), and the server needs no data
//! directory.
//!
//! Keys, all under [`PREFIX`]:
//! - `switchyard:meta`: a hash naming the application and the layout version; a database
//!   whose `meta` names another application or a newer version is refused at start.
//! - `switchyard:owner`: the lease (`HOST:PID:NONCE`) of the server using the database,
//!   renewed every [`RENEW_EVERY`] and dropped at a clean stop; one server per database, as
//!   one per data directory. A server starting finds a lease of a live server of this machine:
//!   it refuses to start; of one of this machine that is gone (killed): it takes it over; of
//!   another machine's: it waits for it to lapse, at most [`LEASE`] and a renewal, then
//!   refuses.
//! - `switchyard:ids`: the highest message id reserved.
//! - `switchyard:room:NAME`: a room's messages, a sorted set of their JSON by id.
//!
//! Bounds: at most `keep` messages per room (the oldest are dropped as new ones are written)
//! and none older than `max_age`: never served once older, and a room's key expires
//! `max_age` after its newest message.
//!
//! When Redis cannot be reached, each batch tries to reconnect: writes fail (logged, and
//! counted in `switchyard_history_write_failures_total`; with `--history-durability full` the
//! `send` fails), reads fail (`history_unavailable`), and everything works again once Redis
//! is back. A write is refused if another server has taken the lease meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Client, Connection, Script};

use super::queue::{Backend, QueuedStore};
use crate::hub::history::{cutoff, Page, StoreError};
use crate::metrics::HistoryMetrics;
use crate::protocol::Message;

/// Every key the store writes starts with this.
pub const PREFIX: &str = "switchyard:";
/// What `switchyard:meta` names as its application.
pub const APPLICATION: &str = "switchyard-history";
/// The layout this build writes and reads (`switchyard:meta`'s `version`).
pub const LAYOUT_VERSION: u64 = 1;
/// How long a server's lease on the database lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one round trip may take before the connection is given up.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

const META: &str = "switchyard:meta";
const OWNER: &str = "switchyard:owner";
/// The highest message id reserved (one server) or handed out (a cluster's sequencer).
pub(crate) const IDS: &str = "switchyard:ids";

/// The error a write script returns when another server holds the lease.
const NOT_OWNER: &str = "SWITCHYARD_NOT_OWNER";

/// Checks the lease (taking it if it lapsed), renews it, and raises the id reservation to
/// ARGV[5] (0: none). Then for each room KEYS[3..], from ARGV[6] on: a count N, then N pairs of
/// id and JSON to add; the room is trimmed to ARGV[3] messages and set to expire ARGV[4] ms
/// after its newest, once per batch.
const WRITE: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return redis.error_reply('SWITCHYARD_NOT_OWNER another switchyard server holds this database')
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local reserve = tonumber(ARGV[5])
if reserve > 0 and reserve > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[5])
end
local keep = tonumber(ARGV[3])
local a = 6
for i = 3, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -(keep + 1))
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
return 1
";

/// Takes the lease (KEYS[1]) for token ARGV[1] for ARGV[2] ms if it is free or already ours:
/// 1, or 0 when another server holds it.
const TAKE_LEASE: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Drops the lease (KEYS[1]) if it is still the stale token ARGV[1].
const DROP_STALE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// At a clean stop, if the lease (KEYS[1]) is still ARGV[1]'s: sets the reservation (KEYS[2])
/// to the last id used, ARGV[2], and drops the lease.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
";

/// How the store bounds history.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Messages kept per room.
    pub keep: usize,
    /// Messages older than this are never served, and a room expires this long after its
    /// newest message.
    pub max_age: Duration,
}

/// The Redis store, opened by [`RedisStore::open`].
#[derive(Debug)]
pub struct RedisStore;

impl RedisStore {
    /// Connects to the Redis at `url`, checks the database is switchyard's (or empty of
    /// switchyard keys), takes its lease and starts the writer. `Err` is one line naming the
    /// URL and the cause.
    pub fn open(
        url: &str,
        settings: Settings,
        metrics: HistoryMetrics,
    ) -> Result<QueuedStore, String> {
        let in_redis = |e: String| format!("history store {url}: {e}");
        let (client, mut conn) = connect_checked(url).map_err(in_redis)?;
        let token = format!(
            "{}:{}:{:016x}",
            hostname(),
            std::process::id(),
            rand::random::<u64>()
        );
        take_lease(&mut conn, &token, url).map_err(in_redis)?;
        RedisStore::start(client, conn, settings, metrics, Some(token), url)
    }

    /// Opens the history of a cluster (`--redis`) to read: every node of the cluster reads it,
    /// and the sequencer writes it (each message with the script that decides its `send`).
    /// Refused while a single server holds the database.
    pub fn shared(
        url: &str,
        settings: Settings,
        metrics: HistoryMetrics,
    ) -> Result<QueuedStore, String> {
        let in_redis = |e: String| format!("{url}: {e}");
        let (client, mut conn) = connect_checked(url).map_err(in_redis)?;
        let owner: Option<String> = redis::cmd("GET")
            .arg(OWNER)
            .query(&mut conn)
            .map_err(|e| in_redis(e.to_string()))?;
        if let Some(owner) = owner {
            return Err(in_redis(format!(
                "a single switchyard server ({owner}) holds this database; stop it, or give the cluster another database"
            )));
        }
        RedisStore::start(client, conn, settings, metrics, None, url)
    }

    fn start(
        client: Client,
        mut conn: Connection,
        settings: Settings,
        metrics: HistoryMetrics,
        token: Option<String>,
        url: &str,
    ) -> Result<QueuedStore, String> {
        let in_redis = |e: String| format!("history store {url}: {e}");
        let last_id: u64 = redis::cmd("GET")
            .arg(IDS)
            .query::<Option<u64>>(&mut conn)
            .map_err(|e| in_redis(e.to_string()))?
            .unwrap_or(0);
        let writer = Writer {
            client,
            conn: Some(conn),
            settings,
            token,
            write: Script::new(WRITE),
            lost: false,
        };
        let store = QueuedStore::start(writer, last_id, metrics, "switchyard-history", None)?;
        tracing::info!(url, last_id, "history store open (Redis)");
        Ok(store)
    }
}

/// A client of the Redis at `url` and a connection to a database that is switchyard's (or
/// holds none of its keys yet).
fn connect_checked(url: &str) -> Result<(Client, Connection), String> {
    let client = Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = connect(&client).map_err(|e| e.to_string())?;
    check_meta(&mut conn)?;
    Ok((client, conn))
}

/// A connection with the store's timeouts.
fn connect(client: &Client) -> redis::RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Writes `meta` into a database that has none; refuses another application's or a newer
/// layout.
fn check_meta(conn: &mut Connection) -> Result<(), String> {
    let text = |e: redis::RedisError| e.to_string();
    let (app, version): (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(META)
        .arg("application")
        .arg("version")
        .query(conn)
        .map_err(text)?;
    match (app.as_deref(), version) {
        (None, None) => redis::cmd("HSET")
            .arg(META)
            .arg("application")
            .arg(APPLICATION)
            .arg("version")
            .arg(LAYOUT_VERSION)
            .query::<()>(conn)
            .map_err(text),
        (Some(APPLICATION), Some(version)) if version <= LAYOUT_VERSION => Ok(()),
        (Some(APPLICATION), Some(version)) => Err(format!(
            "its layout version {version} is newer than this switchyard reads ({LAYOUT_VERSION}); run a newer switchyard or use another database"
        )),
        _ => Err(format!(
            "{META} is not switchyard's (application {app:?}); use another database (redis://HOST:PORT/N)"
        )),
    }
}

/// Takes the database's lease. A lease held by a live server on this machine refuses at once;
/// one left by a server of this machine that is gone (killed) is taken over at once; one
/// held from another machine is waited for, up to [`LEASE`], in case its server is gone.
fn take_lease(conn: &mut Connection, token: &str, url: &str) -> Result<(), String> {
    let deadline = Instant::now() + LEASE + RENEW_EVERY;
    let script = Script::new(TAKE_LEASE);
    let in_use = |holder: &str| {
        format!(
            "in use by another switchyard server ({OWNER} is {holder:?}); stop it or use another database (redis://HOST:PORT/N)"
        )
    };
    // A cluster's nodes hold no lease: their beats say they run.
    let running = crate::cluster::sequencer::running_nodes(conn).map_err(|e| e.to_string())?;
    if let Some(node) = running.first() {
        return Err(format!(
            "in use by a switchyard cluster (node {node} is running); give this server another database (redis://HOST:PORT/N)"
        ));
    }
    let mut waiting = false;
    loop {
        let taken: u8 = script
            .key(OWNER)
            .arg(token)
            .arg(LEASE.as_millis() as u64)
            .invoke(conn)
            .map_err(|e| e.to_string())?;
        if taken == 1 {
            return Ok(());
        }
        let holder: Option<String> = redis::cmd("GET")
            .arg(OWNER)
            .query(conn)
            .map_err(|e| e.to_string())?;
        let Some(holder) = holder else { continue };
        match local_holder(&holder) {
            Some(true) => return Err(in_use(&holder)),
            Some(false) => {
                Script::new(DROP_STALE)
                    .key(OWNER)
                    .arg(&holder)
                    .invoke::<u8>(conn)
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    url,
                    holder,
                    "took over the history database from a server of this machine that is gone"
                );
                continue;
            }
            None => {}
        }
        if Instant::now() >= deadline {
            return Err(in_use(&holder));
        }
        if !waiting {
            tracing::info!(url, holder, "another machine's server holds the history database's lease; waiting for it to lapse");
            waiting = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// For a lease token (`HOST:PID:NONCE`) of this machine: whether its process is alive (and
/// not this one). `None` for another machine's.
fn local_holder(token: &str) -> Option<bool> {
    let mut parts = token.rsplitn(3, ':');
    let (_nonce, pid, host) = (parts.next()?, parts.next()?, parts.next()?);
    if host != hostname() {
        return None;
    }
    let pid: i32 = pid.parse().ok()?;
    if pid <= 0 || pid as u32 == std::process::id() {
        return Some(false);
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    Some(alive)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The room's key.
pub(crate) fn room_key(room: &str) -> String {
    format!("{PREFIX}room:{room}")
}

/// The writer thread's state.
struct Writer {
    client: Client,
    /// `None` after an error, until the next operation reconnects.
    conn: Option<Connection>,
    settings: Settings,
    /// The lease's token; `None` for a cluster's node, which only reads.
    token: Option<String>,
    write: Script,
    /// Another server took the lease: writes are refused from then on.
    lost: bool,
}

/// Runs `op` on the connection in `slot`, connecting first if there is none; an error drops
/// the connection, so the next operation starts on a fresh one.
fn with_conn<T>(
    client: &Client,
    slot: &mut Option<Connection>,
    op: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
) -> redis::RedisResult<T> {
    let conn = match slot {
        Some(conn) => conn,
        None => slot.insert(connect(client)?),
    };
    let result = op(conn);
    if result.is_err() {
        *slot = None;
    }
    result
}

impl Writer {
    fn lose_lease(&mut self) {
        if !self.lost {
            tracing::error!(
                "another switchyard server took this server's lease on the Redis history database: history writes are refused from now on"
            );
            self.lost = true;
        }
    }
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError::Failed(format!("Redis: {error}"))
}

fn lost() -> StoreError {
    StoreError::Failed("another switchyard server holds the Redis history database".into())
}

impl Backend for Writer {
    fn write(&mut self, appends: &[&Arc<Message>], reserve: Option<u64>) -> Result<(), StoreError> {
        if self.lost {
            return Err(lost());
        }
        let Some(token) = &self.token else {
            return Err(StoreError::Failed(
                "a cluster node writes history through the sequencer, not the store".into(),
            ));
        };
        let mut invocation = self.write.key(OWNER);
        invocation
            .key(IDS)
            .arg(token)
            .arg(LEASE.as_millis() as u64)
            .arg(self.settings.keep)
            .arg(self.settings.max_age.as_millis().clamp(1, i64::MAX as u128) as u64)
            .arg(reserve.unwrap_or(0));
        // By room, each in id order: a room is trimmed and its expiry set once per batch.
        let mut rooms: Vec<(&str, Vec<&Message>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for message in appends {
            let at = *index.entry(&message.room).or_insert_with(|| {
                rooms.push((&message.room, Vec::new()));
                rooms.len() - 1
            });
            rooms[at].1.push(message);
        }
        for (room, messages) in rooms {
            invocation.key(room_key(room)).arg(messages.len());
            for message in messages {
                let json = serde_json::to_string(message).map_err(|e| {
                    StoreError::Failed(format!("cannot encode message {}: {e}", message.id))
                })?;
                invocation.arg(message.id).arg(json);
            }
        }
        let result = with_conn(&self.client, &mut self.conn, |conn| {
            invocation.invoke::<u8>(conn)
        });
        match result {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some(NOT_OWNER) => {
                self.lose_lease();
                Err(lost())
            }
            Err(error) => Err(failed(error)),
        }
    }

    fn page(&mut self, room: &str, before: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        let top = before.map_or_else(|| "+inf".to_owned(), |before| format!("({before}"));
        let key = room_key(room);
        let newest_first: Vec<String> = with_conn(&self.client, &mut self.conn, |conn| {
            redis::cmd("ZRANGE")
                .arg(&key)
                .arg(top)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(limit.saturating_add(1))
                .query(conn)
        })
        .map_err(failed)?;
        let oldest = cutoff(self.settings.max_age);
        let mut messages = Vec::with_capacity(newest_first.len());
        for json in &newest_first {
            let message: Message = serde_json::from_str(json).map_err(|e| {
                StoreError::Failed(format!("{key} holds a message that is not one: {e}"))
            })?;
            // Ids grow with time: past the first message too old, all are.
            if message.ts < oldest {
                break;
            }
            messages.push(Arc::new(message));
        }
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page { messages, more })
    }

    fn close(&mut self, last_used: u64) {
        let Some(token) = self.token.clone() else {
            return;
        };
        let released = with_conn(&self.client, &mut self.conn, |conn| {
            Script::new(RELEASE)
                .key(OWNER)
                .key(IDS)
                .arg(&token)
                .arg(last_used)
                .invoke::<u8>(conn)
        });
        match released {
            Ok(1) => {}
            Ok(_) => tracing::warn!("history: the Redis lease was no longer this server's at stop"),
            Err(error) => tracing::error!(%error, "history: releasing the Redis database failed"),
        }
    }

    fn tick(&mut self) -> Result<(), StoreError> {
        if self.lost {
            return Err(lost());
        }
        let Some(token) = self.token.clone() else {
            // A cluster's node holds no lease: only check that Redis answers.
            return with_conn(&self.client, &mut self.conn, |conn| {
                redis::cmd("PING").query::<()>(conn)
            })
            .map_err(failed);
        };
        let renewed = with_conn(&self.client, &mut self.conn, |conn| {
            Script::new(TAKE_LEASE)
                .key(OWNER)
                .arg(&token)
                .arg(LEASE.as_millis() as u64)
                .invoke::<u8>(conn)
        });
        match renewed {
            Ok(1) => Ok(()),
            Ok(_) => {
                self.lose_lease();
                Err(lost())
            }
            Err(error) => {
                tracing::warn!(%error, "history: renewing the Redis lease failed");
                Err(failed(error))
            }
        }
    }

    fn tick_every(&self) -> Duration {
        RENEW_EVERY
    }
}
