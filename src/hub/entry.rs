//! Entries: every change the hub has decided, and the one place they change the rooms and
//! make events.
//!
//! A command is first decided (checked against membership, identity, limits and the retry
//! table, and given its id and time), then applied as an [`Entry`]. Applying reads nothing
//! but the entry and the rooms it changes: no clock, no store, no limits. So the same entries
//! applied in the same order make the same events with the same seqs, which is what a
//! cluster's replicas will rely on (docs/cluster.md, section 2). On one node, the hub decides
//! and applies each entry under the chat lock, in the order it decided them.

use std::sync::Arc;

use super::history::Page;
use super::session::Sent;
use super::{flush_room, Chat, HubConfig, Session};
use crate::protocol::{EncodedEvent, ErrorBody, Event, Message};

/// One decided change.
pub(super) enum Entry {
    /// A message accepted into its room: the members get it, the room's history keeps it
    /// and the sender's retry table keeps its echo.
    Send {
        /// Served here, it keeps the echo; served elsewhere (a replica), `None`.
        sender: Option<Arc<Session>>,
        message: Arc<Message>,
    },
    /// A send retried with a `client_id` already sent: the sender gets the original again.
    Retry {
        sender: Arc<Session>,
        echo: EncodedEvent,
    },
    /// A session joins a room at `ts` (µs since the Unix epoch; its `history` holds the
    /// messages younger than the max age then): it gets the room's history and presence, and
    /// the members hear of it at the room's next flush. A member joining again gets a fresh
    /// view only.
    Join {
        session: Arc<Session>,
        room: String,
        ts: u64,
    },
    /// A session leaves a room; the members hear of it at the room's next flush.
    Leave { session: Arc<Session>, room: String },
    /// A member is typing; the members hear of it at the room's next flush.
    Typing { name: Arc<str>, room: String },
    /// The pending presence and typing changes of `rooms` go to their members, as of `at`
    /// (µs on the hub's timeline).
    Flush { rooms: Vec<String>, at: u64 },
    /// A command refused: its session gets an `error` event.
    Error {
        session: Arc<Session>,
        error: ErrorBody,
        client_id: Option<String>,
    },
    /// A page of a room's history, for the session that asked.
    Page {
        session: Arc<Session>,
        room: String,
        before: Option<u64>,
        page: Page,
    },
}

impl Chat {
    /// Applies a decided entry now, on this hub's clock ([`Chat::commit_at`]).
    pub(super) fn commit(&mut self, entry: Entry, config: &HubConfig) {
        let now = self.clock();
        self.commit_at(entry, config, now);
    }

    /// Applies an entry decided at `now` (µs on the hub's timeline: its own clock, or the
    /// log's), then flushes the room whose presence it changed if that room was quiet for a
    /// presence interval (else the change waits for [`Chat::due_rooms`]).
    pub(super) fn commit_at(&mut self, entry: Entry, config: &HubConfig, now: u64) {
        if let Some(room) = self.apply(entry, config) {
            let quiet = self
                .rooms
                .get(&room)
                .is_some_and(|r| quiet_since(r.last_flush, now, config));
            if quiet {
                self.apply(
                    Entry::Flush {
                        rooms: vec![room],
                        at: now,
                    },
                    config,
                );
            }
        }
    }

    /// The rooms with pending changes whose presence interval has passed at `now`, and those
    /// dropped since their change, by name (so every replica flushes them in one order).
    pub(super) fn due_rooms(&self, now: u64, config: &HubConfig) -> Vec<String> {
        let mut due: Vec<String> = self
            .pending_presence
            .iter()
            .filter(|name| {
                self.rooms
                    .get(*name)
                    .is_none_or(|room| quiet_since(room.last_flush, now, config))
            })
            .cloned()
            .collect();
        due.sort_unstable();
        due
    }

    /// Now on the hub's own timeline: µs since it started.
    pub(super) fn clock(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Applies one entry: changes the rooms and hands its events to the fan-out. Returns the
    /// room whose presence or typing changed, which now waits for a flush.
    pub(super) fn apply(&mut self, entry: Entry, config: &HubConfig) -> Option<String> {
        self.tick += 1;
        let tick = self.tick;
        match entry {
            Entry::Send { sender, message } => {
                let event = Event::Message(&message).encode();
                // Before the fan-out pushes it, so the sender's table learns the echo's seq.
                if let Some(sender) = sender {
                    sender.lock().sent.insert(
                        &message.client_id,
                        message.id,
                        Sent::Echo(event.clone()),
                        config.dedup_window,
                    );
                }
                if let Some(room) = self.rooms.get_mut(&message.room) {
                    room.last_used = tick;
                    self.fanout.room(room.members(), event);
                    room.record(message.clone(), config.history_len);
                }
            }
            Entry::Retry { sender, echo } => self.fanout.one(&sender, vec![echo]),
            Entry::Join { session, room, ts } => {
                let entry = self.rooms.get_mut(&room)?;
                entry.last_used = tick;
                // The joiner gets the published view first; its own join reaches it, like
                // everyone else, in the next presence_diff.
                let view = vec![
                    entry.history_event(&room, config.history_max_age, ts),
                    entry.snapshot_event(&room),
                ];
                self.fanout.one(&session, view);
                if session.lock().rooms.contains(&room) {
                    return None;
                }
                entry.add(session.clone());
                session.lock().rooms.push(room.clone());
                return Some(self.pending(room));
            }
            Entry::Leave { session, room } => {
                session.lock().rooms.retain(|r| *r != room);
                let entry = self.rooms.get_mut(&room)?;
                if entry.remove(&session) {
                    entry.last_used = tick;
                    return Some(self.pending(room));
                }
            }
            Entry::Typing { name, room } => {
                self.rooms.get_mut(&room)?.typing(&name);
                return Some(self.pending(room));
            }
            Entry::Flush { rooms, at } => {
                for name in rooms {
                    self.pending_presence.remove(&name);
                    if let Some(room) = self.rooms.get_mut(&name) {
                        if room.has_pending() {
                            flush_room(&self.fanout, room, &name, config.presence_list_limit, at);
                        }
                    }
                }
            }
            Entry::Error {
                session,
                error,
                client_id,
            } => {
                let event = Event::Error {
                    code: error.code,
                    message: &error.message,
                    client_id: client_id.as_deref(),
                    retry_after_ms: error.retry_after_ms,
                }
                .encode();
                self.fanout.one(&session, vec![event]);
            }
            Entry::Page {
                session,
                room,
                before,
                page,
            } => {
                let event = Event::HistoryPage {
                    room: &room,
                    before,
                    messages: page.messages.iter().map(|m| m.as_ref()).collect(),
                    more: page.more,
                }
                .encode();
                self.fanout.one(&session, vec![event]);
            }
        }
        None
    }

    /// Marks `room` as having changes waiting for a flush; returns it.
    fn pending(&mut self, room: String) -> String {
        self.pending_presence.insert(room.clone());
        room
    }
}

/// Whether a room last flushed at `last` (never: `None`) has been quiet for a presence
/// interval at `now`.
fn quiet_since(last: Option<u64>, now: u64, config: &HubConfig) -> bool {
    let interval = config.presence_interval.as_micros() as u64;
    last.is_none_or(|at| now.saturating_sub(at) >= interval)
}
