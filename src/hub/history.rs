//! The seam between the hub and where room history is kept: the [`HistoryStore`] trait, and
//! [`MemoryStore`], the store that keeps the last few messages per room in memory.
//!
//! The hub owns this seam; backends live outside it (`crate::store`: the embedded SQLite
//! store, later the cluster's Redis one) and the server picks one. A store never blocks its
//! caller: the hub calls it while holding its chat lock, so writes are queued to the store's
//! own writer, and answers come back on a channel ([`Reply`]) or a callback the store runs on
//! its own thread ([`Then`]), never inside the call that queued them. A store keeps each
//! room's messages in id order and answers reads only after every write queued before them is
//! applied, so a read sees every message decided before it.
//!
//! Message ids are handed out by the hub, never reused: a store that outlives the process
//! reserves them in blocks, on disk before any id of a block is used ([`HistoryStore::reserve_ids`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::protocol::Message;

/// An answer from a store, sent once the store has it.
pub type Reply<T> = oneshot::Receiver<Result<T, StoreError>>;

/// Run by the store on its own thread once a write is done (or failed), in the order the
/// writes were queued.
pub type Then = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// When a message is broadcast relative to its write (`--history-durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Broadcast at once and written in the next batch, milliseconds later: a crash can lose
    /// the last batch, which members may already have seen.
    #[default]
    Normal,
    /// Broadcast (the sender's echo too) only once the message is on disk; a failed write
    /// fails the `send`, and nobody sees the message.
    Full,
}

/// Why a store could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Its queue of writes is full: try again shortly.
    #[error("the history store is busy (its write queue is full)")]
    Busy,
    /// A write or read failed, or the store is closed; the text says why (for logs).
    #[error("the history store failed: {0}")]
    Failed(String),
}

/// One page of a room's older messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Whether the room has messages older than the first of this page.
    pub more: bool,
}

/// Where room history is kept. See the module docs for the rules every store keeps.
pub trait HistoryStore: Send + Sync + fmt::Debug {
    /// The highest message id that may have been handed out before this store was opened:
    /// the hub starts above it.
    fn last_id(&self) -> u64;

    /// Ids up to this one may be handed out now (reserved durably).
    fn reserved_ids(&self) -> u64;

    /// Asks for every id up to `up_to` to be reserved; answers with the new
    /// [`HistoryStore::reserved_ids`]. Asking again before the answer is harmless.
    fn reserve_ids(&self, up_to: u64) -> Reply<u64>;

    /// Queues a message for writing. `then`, if given, runs once it is written (or failed).
    /// `Err` when it could not even be queued: then `then` never runs.
    fn append(&self, message: Arc<Message>, then: Option<Then>) -> Result<(), StoreError>;

    /// A room's newest messages, at most `limit`, oldest first, none older than `max_age`.
    fn recent(&self, room: &str, limit: usize) -> Reply<Vec<Arc<Message>>>;

    /// Up to `limit` messages of a room older than `before` (or the newest when `None`).
    fn page(&self, room: &str, before: Option<u64>, limit: usize) -> Reply<Page>;

    /// The hub dropped a room it no longer serves: a store that lives only in memory forgets
    /// its history, one that outlives the process keeps it.
    fn forget(&self, room: &str);

    /// Writes everything queued, records that no id above `last_used` was handed out (so the
    /// next start continues right after it), and closes. Blocks until done.
    fn close(&self, last_used: u64);

    /// `Err` with the cause while the store's last operation failed (its backend cannot be
    /// reached): `GET /readyz`. A store that cannot fail is always ready.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Microseconds since the Unix epoch, the unit of [`Message::ts`].
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The oldest `ts` a message may have and still be kept, for a `max_age`.
pub fn cutoff(max_age: Duration) -> u64 {
    now_micros().saturating_sub(max_age.as_micros().min(u64::MAX as u128) as u64)
}

/// An answer that is ready now.
pub fn ready<T>(value: Result<T, StoreError>) -> Reply<T> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(value);
    rx
}

/// The last `len` messages of each room the hub serves, in memory: nothing survives a restart
/// or the room being dropped.
#[derive(Debug)]
pub struct MemoryStore {
    len: usize,
    max_age: Duration,
    rooms: Mutex<HashMap<String, VecDeque<Arc<Message>>>>,
}

impl MemoryStore {
    /// Keeps `len` messages per room, none older than `max_age`.
    pub fn new(len: usize, max_age: Duration) -> Self {
        MemoryStore {
            len,
            max_age,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    /// A room's kept messages, at most `limit` before `before`, and whether there are older.
    fn select(&self, room: &str, before: Option<u64>, limit: usize) -> Page {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = rooms.get(room) else {
            return Page {
                messages: Vec::new(),
                more: false,
            };
        };
        let oldest = cutoff(self.max_age);
        let kept: Vec<&Arc<Message>> = ring
            .iter()
            .filter(|m| m.ts >= oldest && before.is_none_or(|b| m.id < b))
            .collect();
        let skip = kept.len().saturating_sub(limit);
        Page {
            messages: kept[skip..].iter().map(|m| Arc::clone(m)).collect(),
            more: skip > 0,
        }
    }
}

impl HistoryStore for MemoryStore {
    fn last_id(&self) -> u64 {
        0
    }

    fn reserved_ids(&self) -> u64 {
        u64::MAX
    }

    fn reserve_ids(&self, _up_to: u64) -> Reply<u64> {
        ready(Ok(u64::MAX))
    }

    fn append(&self, message: Arc<Message>, then: Option<Then>) -> Result<(), StoreError> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let ring = rooms.entry(message.room.clone()).or_default();
        ring.push_back(message);
        while ring.len() > self.len {
            ring.pop_front();
        }
        drop(rooms);
        if let Some(then) = then {
            // Nothing to wait for; the hub never asks a memory store for durability.
            then(Ok(()));
        }
        Ok(())
    }

    fn recent(&self, room: &str, limit: usize) -> Reply<Vec<Arc<Message>>> {
        ready(Ok(self.select(room, None, limit).messages))
    }

    fn page(&self, room: &str, before: Option<u64>, limit: usize) -> Reply<Page> {
        ready(Ok(self.select(room, before, limit)))
    }

    fn forget(&self, room: &str) {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(room);
    }

    fn close(&self, _last_used: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(room: &str, id: u64, ts: u64) -> Arc<Message> {
        Arc::new(Message {
            room: room.into(),
            id,
            from: "ann".into(),
            text: format!("m{id}"),
            ts,
            client_id: format!("c{id}"),
        })
    }

    fn ids(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn the_memory_store_keeps_the_last_len_and_pages_back_through_them() {
        let store = MemoryStore::new(5, Duration::from_secs(3600));
        let now = now_micros();
        for id in 1..=8 {
            store.append(message("r", id, now), None).unwrap();
        }
        let newest = store.select("r", None, 3);
        assert_eq!((ids(&newest), newest.more), (vec![6, 7, 8], true));
        let older = store.select("r", Some(6), 3);
        assert_eq!((ids(&older), older.more), (vec![4, 5], false));
        store.forget("r");
        assert!(store.select("r", None, 3).messages.is_empty());
    }

    #[test]
    fn the_memory_store_serves_nothing_older_than_max_age() {
        let store = MemoryStore::new(5, Duration::from_secs(60));
        let now = now_micros();
        store
            .append(message("r", 1, now - 120_000_000), None)
            .unwrap();
        store.append(message("r", 2, now), None).unwrap();
        let page = store.select("r", None, 5);
        assert_eq!((ids(&page), page.more), (vec![2], false));
    }
}
