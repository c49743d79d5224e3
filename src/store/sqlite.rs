//! The embedded history store: SQLite (bundled, WAL mode) in the data directory, written by a
//! thread of its own ([`QueuedStore`]) that commits each batch of queued writes in one
//! transaction, so a reserved id is on disk before the hub hands it out.
//!
//! The file: `history.db` in the data directory, with a `lock` file beside it that the server
//! holds (`flock`) for as long as it runs, so two servers never share a directory. The schema
//! carries its version (`PRAGMA user_version`) and an application id; a file of another
//! application or of a newer version is refused at start, and nothing in the directory is
//! changed then. While the server runs, the file can be read with the `sqlite3` tool.
//!
//! Bounds: at most `keep` messages per room (the oldest are deleted as new ones are written)
//! and none older than `max_age` (swept every minute, and never served once older).

use std::collections::HashMap;
use std::fs::{self, OpenOptions, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Row};

use super::queue::{Backend, QueuedStore};
use crate::hub::history::{cutoff, Page, StoreError};
use crate::hub::Durability;
use crate::metrics::HistoryMetrics;
use crate::protocol::Message;

/// The schema this build writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// Marks the file as switchyard's (`PRAGMA application_id`, "SYHD").
pub const APPLICATION_ID: i64 = 0x5359_4844;
/// The database file in the data directory.
pub const DB_FILE: &str = "history.db";
/// The lock file in the data directory.
pub const LOCK_FILE: &str = "lock";

/// How long a write waits for another connection's lock on the file (someone writing with
/// the `sqlite3` tool) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// How often messages past `max_age` are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Rooms whose message count the writer remembers; past it, it forgets them all and counts
/// again as rooms are written.
const COUNTED_ROOMS: usize = 100_000;

const SCHEMA: &str = "
BEGIN;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
CREATE INDEX messages_by_ts ON messages (ts);
";

/// How the store bounds and writes history.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Messages kept per room.
    pub keep: usize,
    /// Messages older than this are deleted and never served.
    pub max_age: Duration,
    /// `Full` syncs every commit to disk (`synchronous=FULL`); `Normal` commits survive a
    /// crash of the process, not of the machine (`synchronous=NORMAL` in WAL mode).
    pub durability: Durability,
}

/// The embedded store, opened by [`SqliteStore::open`].
#[derive(Debug)]
pub struct SqliteStore;

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`. `Err` is one line naming the path and
    /// the cause; nothing in the directory is changed then, besides creating it and its lock
    /// file.
    pub fn open(
        dir: &Path,
        settings: Settings,
        metrics: HistoryMetrics,
    ) -> Result<QueuedStore, String> {
        let shown = dir.display();
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data directory {shown}: {e}"))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot write in data directory {shown}: {e}"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(format!(
                    "data directory {shown} is in use by another switchyard server (it holds {}); stop it or give another --data-dir",
                    lock_path.display()
                ))
            }
            Err(TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", lock_path.display()))
            }
        }
        let path = dir.join(DB_FILE);
        let in_file = |e: String| format!("history database {}: {e}", path.display());
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| in_file(e.to_string()))?;
        let last_id = prepare(&conn, settings.durability).map_err(in_file)?;
        let mut writer = Writer {
            conn,
            settings,
            counts: HashMap::new(),
        };
        // Before serving: nothing past max age is kept from the last run.
        writer.sweep();
        let store = QueuedStore::start(writer, last_id, metrics, "switchyard-history", Some(lock))?;
        tracing::info!(path = %path.display(), last_id, "history store open");
        Ok(store)
    }
}

/// Checks or creates the schema and sets the connection up; returns the highest id that may
/// have been handed out.
fn prepare(conn: &Connection, durability: Durability) -> Result<u64, String> {
    let text = |e: rusqlite::Error| e.to_string();
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(text)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(text)?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(format!(
            "not a switchyard history database (application id {app_id:#x})"
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(format!(
            "schema version {version} is newer than this switchyard reads ({SCHEMA_VERSION}); run a newer switchyard or give another --data-dir"
        ));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(text)?;
        if tables > 0 {
            return Err("not a switchyard history database (it has tables of its own)".into());
        }
        // One transaction: a crash leaves either no schema or all of it, versioned.
        conn.execute_batch(&format!(
            "{SCHEMA} PRAGMA application_id = {APPLICATION_ID}; \
             PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))
        .map_err(text)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(text)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("cannot use WAL mode (journal mode is {mode})"));
    }
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(text)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(text)?;
    let reserved: i64 = conn
        .query_row(
            "SELECT coalesce((SELECT value FROM meta WHERE key = 'ids_reserved'), 0)",
            [],
            |r| r.get(0),
        )
        .map_err(text)?;
    let stored: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
            r.get(0)
        })
        .map_err(text)?;
    Ok(reserved.max(stored).max(0) as u64)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    settings: Settings,
    /// Messages per room on disk, for the rooms written lately.
    counts: HashMap<String, u64>,
}

fn message(row: &Row) -> rusqlite::Result<Arc<Message>> {
    Ok(Arc::new(Message {
        room: row.get(0)?,
        id: row.get::<_, i64>(1)? as u64,
        from: row.get(2)?,
        text: row.get(3)?,
        ts: row.get::<_, i64>(4)? as u64,
        client_id: row.get(5)?,
    }))
}

fn failed(error: rusqlite::Error) -> StoreError {
    StoreError::Failed(error.to_string())
}

impl Backend for Writer {
    fn write(&mut self, appends: &[&Arc<Message>], reserve: Option<u64>) -> Result<(), StoreError> {
        let result = self.transaction(appends, reserve);
        if result.is_err() {
            // The counts may have moved with the rolled-back rows.
            self.counts.clear();
        }
        result.map_err(failed)
    }

    fn page(&mut self, room: &str, before: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        self.select(room, before, limit).map_err(failed)
    }

    fn close(&mut self, last_used: u64) {
        let result = self.conn.transaction().and_then(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('ids_reserved', ?1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [last_used as i64],
            )?;
            tx.commit()
        });
        if let Err(error) = result {
            tracing::error!(%error, "history: recording the last message id failed");
        }
    }

    fn tick(&mut self) -> Result<(), StoreError> {
        // A failed sweep is logged and tried again; reads still skip what it missed.
        self.sweep();
        Ok(())
    }

    fn tick_every(&self) -> Duration {
        SWEEP_EVERY
    }
}

impl Writer {
    /// One transaction: the appends, the rooms trimmed to `keep`, and the id reservation.
    fn transaction(
        &mut self,
        appends: &[&Arc<Message>],
        reserve: Option<u64>,
    ) -> rusqlite::Result<()> {
        let Writer {
            conn,
            counts,
            settings,
            ..
        } = self;
        if counts.len() > COUNTED_ROOMS {
            counts.clear();
        }
        let tx = conn.transaction()?;
        {
            let mut count = tx.prepare_cached("SELECT count(*) FROM messages WHERE room = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (room, id, sender, text, ts, client_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut touched: Vec<&str> = Vec::new();
            for m in appends {
                if !counts.contains_key(&m.room) {
                    let n: i64 = count.query_row([&m.room], |r| r.get(0))?;
                    counts.insert(m.room.clone(), n as u64);
                }
                insert.execute(params![
                    m.room,
                    m.id as i64,
                    m.from,
                    m.text,
                    m.ts as i64,
                    m.client_id
                ])?;
                *counts.get_mut(&m.room).expect("counted above") += 1;
                if !touched.contains(&m.room.as_str()) {
                    touched.push(&m.room);
                }
            }
            let mut trim = tx.prepare_cached(
                "DELETE FROM messages WHERE room = ?1 AND id IN \
                 (SELECT id FROM messages WHERE room = ?1 ORDER BY id LIMIT ?2)",
            )?;
            for room in touched {
                let n = counts.get_mut(room).expect("counted above");
                let keep = settings.keep as u64;
                if *n > keep {
                    trim.execute(params![room, (*n - keep) as i64])?;
                    *n = keep;
                }
            }
            if let Some(up_to) = reserve {
                set_reserved(&tx, up_to)?;
            }
        }
        tx.commit()
    }

    fn select(&mut self, room: &str, before: Option<u64>, limit: usize) -> rusqlite::Result<Page> {
        let mut select = self.conn.prepare_cached(
            "SELECT room, id, sender, text, ts, client_id FROM messages \
             WHERE room = ?1 AND id < ?2 AND ts >= ?3 ORDER BY id DESC LIMIT ?4",
        )?;
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        let oldest = cutoff(self.settings.max_age) as i64;
        let mut messages = select
            .query_map(
                params![room, before, oldest, limit.saturating_add(1) as i64],
                message,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page { messages, more })
    }

    /// Deletes every message past `max_age`.
    fn sweep(&mut self) {
        let oldest = cutoff(self.settings.max_age) as i64;
        match self
            .conn
            .execute("DELETE FROM messages WHERE ts < ?1", [oldest])
        {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::debug!(deleted, "history: deleted messages past --history-max-age");
                self.counts.clear();
            }
            Err(error) => tracing::error!(%error, "history: sweeping old messages failed"),
        }
    }
}

/// Raises the reservation on disk (never lowers it).
fn set_reserved(conn: &Connection, up_to: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('ids_reserved', ?1) \
         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        [up_to as i64],
    )?;
    Ok(())
}
