//! The cluster's one ordered log: a Redis Stream (`switchyard:log`) that every node reads in
//! full and in order (docs/cluster.md). This module only appends entries and reads them back;
//! what an entry says is the sequencer's business.
//!
//! **Gaps are detected, never skipped.** Each entry carries the id of the entry before it
//! (field `p`), kept by the append script in `switchyard:log:last`. A reader checks every
//! entry against the last id it read: an entry whose predecessor it did not read means
//! entries it never saw are gone (trimmed past it while it lagged, or lost by Redis: a restart
//! without persistence, a `FLUSHALL`), and it reports [`Read::Lost`] instead of going on as
//! if nothing happened. A Redis restarted on its data keeps the chain, and the reader goes on
//! where it was.
//!
//! A log that started again after losing its data hands out ids from Redis's clock in a new
//! stream, which may be at or below a reader's position, where `XREAD` would never return
//! them: each time a read comes back empty, the reader checks the newest id (and, if it is the
//! reader's own position, that the entry there is still the one it read), and if the log
//! restarted behind it, reports [`Read::WentBack`] and reads the log from its start, whose
//! first entry breaks the chain.
//!
//! **Retention** is by time: each append trims entries older than `retention` (`XADD MINID`,
//! on Redis's clock, `TIME`).
//!
//! The reader runs on a thread of its own with a connection of its own, since `XREAD BLOCK`
//! holds its connection for as long as it waits.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{Client, Commands, Connection, Script, Value};
use tokio::sync::mpsc;

/// The stream.
pub const LOG: &str = "switchyard:log";
/// The id of the newest entry ever appended (the next entry's predecessor).
pub const LAST: &str = "switchyard:log:last";

/// How long one `XREAD` blocks before the reader checks whether it should stop.
const BLOCK: Duration = Duration::from_millis(500);
/// Entries one read returns at most.
const READ_COUNT: usize = 1024;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to reach Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Appends ARGV[1] as the body (`e`) of a new entry of stream KEYS[1], with the previous
/// entry's id (`p`, from KEYS[2]), trimming entries older than ARGV[2] ms; returns the id.
pub(crate) const APPEND: &str = r"
local prev = redis.call('GET', KEYS[2]) or '0-0'
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
if oldest < 0 then oldest = 0 end
local id = redis.call('XADD', KEYS[1], 'MINID', string.format('%d', oldest), '*', 'p', prev, 'e', ARGV[1])
redis.call('SET', KEYS[2], id)
return id
";

/// A position in the log: a stream entry id, `MS-SEQ`. `LogId::ZERO` is before the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogId {
    /// Milliseconds of Redis's clock when the entry was appended.
    pub ms: u64,
    /// Entries appended before it in the same millisecond.
    pub seq: u64,
}

impl LogId {
    /// Before every entry.
    pub const ZERO: LogId = LogId { ms: 0, seq: 0 };
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for LogId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ms, seq) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a stream id"))?;
        let number = |n: &str| {
            n.parse::<u64>()
                .map_err(|_| format!("{s:?} is not a stream id"))
        };
        Ok(LogId {
            ms: number(ms)?,
            seq: number(seq)?,
        })
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it is in the log.
    pub id: LogId,
    /// What the sequencer wrote.
    pub body: Vec<u8>,
}

/// What a reader reports, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The next entries, each the successor of the one before (the first, of the last entry
    /// reported before); none when Redis is back after an outage with nothing new.
    Entries(Vec<Entry>),
    /// Entries after `after` are gone before the reader saw them: the next entry it found,
    /// `found`, follows `expected_prev`, not the last one it read. It goes on from `found`
    /// (the next report starts after it); what was built on the entries up to `after` must be
    /// rebuilt or reset.
    Lost {
        /// The last entry the reader had read.
        after: LogId,
        /// The entry it found next, reported in this `Lost` and not again.
        found: Entry,
        /// The entry `found` follows: [`LogId::ZERO`] when it starts a new log (Redis lost
        /// its data), an entry the reader never saw when it was trimmed first.
        prev: LogId,
    },
    /// Redis cannot be reached or answered an error; the reader keeps trying. Reported once
    /// per outage; the next `Entries` or `Lost` means it is back.
    Unreachable(String),
    /// The log no longer holds `after`, the last entry the reader read: Redis came back
    /// without it (without any data, or with an older copy of it). What was built on the
    /// entries up to `after` is ahead of what Redis holds. The reader goes on from the log's
    /// start; what it finds there, up to a new log's first entry, is reported as usual.
    WentBack {
        /// The last entry the reader had read.
        after: LogId,
    },
}

/// Appends `body` as a new entry, trimming entries older than `retention`; returns its id.
pub fn append(
    conn: &mut Connection,
    body: &[u8],
    retention: Duration,
) -> redis::RedisResult<LogId> {
    let id: String = Script::new(APPEND)
        .key(LOG)
        .key(LAST)
        .arg(body)
        .arg(retention.as_millis().min(u64::MAX as u128) as u64)
        .invoke(conn)?;
    parse_id(&id, "XADD returned")
}

/// A stream id Redis gave, or a parse error naming where it came from.
fn parse_id(id: &str, what: &'static str) -> redis::RedisResult<LogId> {
    id.parse()
        .map_err(|e: String| redis::RedisError::from((redis::ErrorKind::Parse, what, e)))
}

/// The id of the newest entry ever appended ([`LogId::ZERO`] if none): where a reader that
/// wants only new entries starts.
pub fn tip(conn: &mut Connection) -> redis::RedisResult<LogId> {
    let last: Option<String> = conn.get(LAST)?;
    match last {
        None => Ok(LogId::ZERO),
        Some(id) => parse_id(&id, "switchyard:log:last"),
    }
}

/// A reader thread; stops when dropped (within [`BLOCK`]) or when its receiver is dropped.
#[derive(Debug)]
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// Reads the log from after `after` on its own thread and connection, sending what it
    /// reads on `reports` (bounded: a consumer that falls behind slows the reader, which
    /// never drops a report).
    pub fn spawn(
        client: Client,
        after: LogId,
        reports: mpsc::Sender<Read>,
    ) -> std::io::Result<Reader> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("switchyard-log-reader".into())
            .spawn(move || read_loop(&client, after, &reports, &stopping))?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn connect(client: &Client) -> redis::RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    // A blocked read waits BLOCK; a little more for the reply to travel.
    conn.set_read_timeout(Some(BLOCK + Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

fn read_loop(client: &Client, mut after: LogId, reports: &mpsc::Sender<Read>, stop: &AtomicBool) {
    // Where XREAD reads from: `after`, except after the log restarted behind it (below).
    let mut read_from = after;
    // The predecessor of the entry `after`, once the reader has read one.
    let mut after_prev: Option<LogId> = None;
    let mut conn: Option<Connection> = None;
    let mut backoff = Duration::from_millis(50);
    let mut unreachable = false;
    let options = StreamReadOptions::default()
        .block(BLOCK.as_millis() as usize)
        .count(READ_COUNT);
    while !stop.load(Ordering::Acquire) {
        let result = match &mut conn {
            Some(c) => c.xread_options::<_, _, Option<StreamReadReply>>(
                &[LOG],
                &[read_from.to_string()],
                &options,
            ),
            None => match connect(client) {
                Ok(c) => {
                    conn = Some(c);
                    continue;
                }
                Err(error) => Err(error),
            },
        };
        let reply = match result {
            Ok(reply) => reply,
            Err(error) => {
                conn = None;
                if !unreachable {
                    unreachable = true;
                    tracing::warn!(%error, "log reader: Redis cannot be reached; retrying");
                    if reports
                        .blocking_send(Read::Unreachable(error.to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let back = std::mem::replace(&mut unreachable, false);
        let ids = reply
            .and_then(|r| r.keys.into_iter().next())
            .map(|k| k.ids)
            .unwrap_or_default();
        if back && ids.is_empty() && reports.blocking_send(Read::Entries(Vec::new())).is_err() {
            // Back, with nothing new: said with an empty `Entries`.
            return;
        }
        if ids.is_empty() {
            // Nothing new. A log that lost its data and started again may hand out ids at or
            // below `after` (they come from Redis's clock, in a new stream), which XREAD from
            // `after` never returns: then read the new log from its start (its first entry
            // breaks the chain and is reported `Lost`).
            if let (Some(c), false) = (&mut conn, read_from == LogId::ZERO) {
                match restarted_behind(c, after, after_prev) {
                    Ok(true) => {
                        tracing::warn!(%after, "log reader: the log restarted behind this reader");
                        read_from = LogId::ZERO;
                        if reports.blocking_send(Read::WentBack { after }).is_err() {
                            return;
                        }
                    }
                    Ok(false) => {}
                    Err(_) => conn = None,
                }
            }
            continue;
        }
        let mut entries = Vec::with_capacity(ids.len());
        for raw in ids {
            let entry = match decode(&raw) {
                Ok(entry) => entry,
                Err(error) => {
                    // Not ours: nothing after it can be trusted to be complete either.
                    tracing::error!(id = raw.id, %error, "log reader: an entry it cannot read");
                    let _ = reports.blocking_send(Read::Unreachable(error));
                    return;
                }
            };
            let Chained { entry, prev } = entry;
            let id = entry.id;
            if prev == after {
                entries.push(entry);
            } else {
                if !entries.is_empty()
                    && reports
                        .blocking_send(Read::Entries(std::mem::take(&mut entries)))
                        .is_err()
                {
                    return;
                }
                tracing::warn!(%after, found = %id, %prev, "log reader: entries lost before they were read");
                if reports
                    .blocking_send(Read::Lost {
                        after,
                        found: entry,
                        prev,
                    })
                    .is_err()
                {
                    return;
                }
            }
            after = id;
            after_prev = Some(prev);
            read_from = after;
        }
        if !entries.is_empty() && reports.blocking_send(Read::Entries(entries)).is_err() {
            return;
        }
    }
}

/// Whether the log no longer holds the entry `after` (whose predecessor was `after_prev`) as
/// its newest or older: its newest id is below `after`, or is `after` but another entry.
fn restarted_behind(
    conn: &mut Connection,
    after: LogId,
    after_prev: Option<LogId>,
) -> redis::RedisResult<bool> {
    let newest = tip(conn)?;
    if newest != after {
        return Ok(newest < after);
    }
    let Some(expected) = after_prev else {
        return Ok(false);
    };
    let id = after.to_string();
    let range: redis::streams::StreamRangeReply = conn.xrange(LOG, &id, &id)?;
    Ok(match range.ids.first().map(decode) {
        Some(Ok(entry)) => entry.prev != expected,
        Some(Err(_)) | None => true,
    })
}

/// An entry with its predecessor's id.
struct Chained {
    entry: Entry,
    prev: LogId,
}

fn decode(raw: &redis::streams::StreamId) -> Result<Chained, String> {
    let id: LogId = raw.id.parse()?;
    let field = |name: &str| match raw.map.get(name) {
        Some(Value::BulkString(bytes)) => Ok(bytes.clone()),
        other => Err(format!("entry {id}: field {name:?} is {other:?}")),
    };
    let prev = String::from_utf8(field("p")?)
        .map_err(|_| format!("entry {id}: its predecessor is not text"))?
        .parse()?;
    Ok(Chained {
        entry: Entry {
            id,
            body: field("e")?,
        },
        prev,
    })
}
